"""Step 1 (θ_{t−1} = θ0): pair_geometry(zero_a=True) skips the bases and Bures solves but
reports what the full path reports wherever it is defined (METHOD §1)."""

import pytest
import torch

from cpt.diagnostics import GeometrySettings, pair_geometry
from cpt.geometry import LowRankDelta


def test_zero_state_rows_equal_the_full_path():
    generator = torch.Generator().manual_seed(0)
    updates = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(48, 40, generator=generator),
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 40, generator=generator),
        "model.layers.1.mlp.up_proj.weight": torch.zeros(64, 40),  # unchanged tensor: SAR undefined too
        "model.layers.0.self_attn.k_proj.weight": LowRankDelta(
            torch.randn(16, 4, generator=generator), torch.randn(4, 40, generator=generator), 0.5
        ),
    }
    shapes = {name: (16, 40) if isinstance(d, LowRankDelta) else tuple(d.shape) for name, d in updates.items()}
    names = list(updates)

    def state(name):
        return torch.zeros(shapes[name])

    settings = GeometrySettings(rank=8)
    full = pair_geometry(names, state, updates.__getitem__, settings)
    fast = pair_geometry(names, state, updates.__getitem__, settings, zero_a=True)
    assert list(fast) == names
    for name in names:
        assert set(fast[name]) == set(full[name])  # the JSON keeps its shape
        for key in ("geometry_conflict", "sar_a_to_b", "sar_b_to_a", "norm_a", "rank_a"):
            assert fast[name][key] == pytest.approx(full[name][key]), (name, key)
        assert fast[name]["norm_b"] == pytest.approx(full[name]["norm_b"], rel=1e-6)
        assert fast[name]["rank_b"] is None and fast[name]["union_rank"] is None  # would need Δ_b's basis
    assert fast["model.layers.0.mlp.up_proj.weight"]["sar_b_to_a"] == 0.0
    assert fast["model.layers.1.mlp.up_proj.weight"]["sar_b_to_a"] is None
    assert fast["model.layers.0.self_attn.q_proj.weight"]["geometry_conflict"] is None
