"""What a merge did (METHOD §2.10): the generic helpers on hand-worked values, and GCWM's
per-branch records checked against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from synthetic_deltas import delta

from cpt.merging.gcwm import GCWMParams, gcwm_merge
from cpt.merging.inner_solver import adam_merge
from cpt.merging.merge_diagnostics import (
    aggregate_by_family,
    dev_sum,
    effective_scale,
    plain_sum,
    relative_change,
    relative_norm,
)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def test_helpers_on_hand_worked_values():
    v1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    v2 = torch.tensor([[0.0, 2.0], [0.0, 0.0]], dtype=F64)
    s = plain_sum([v1, v2], [1.0, 0.5])
    assert torch.equal(s, torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=F64))
    # task arithmetic: the merge is the plain sum, dev_sum = 0
    assert float(dev_sum(s, [v1, v2], [1.0, 0.5])) == 0.0
    # m = (1, 1, 1, 1): ‖m − s‖ = √2, ‖s‖ = √2 → 1
    assert float(dev_sum(torch.ones(2, 2, dtype=F64), [v1, v2], [1.0, 0.5])) == pytest.approx(1.0)
    assert float(relative_change(3 * v1, v1)) == pytest.approx(2.0)
    assert float(relative_norm(v2, v1)) == pytest.approx(2.0)
    assert math.isnan(float(relative_norm(v1, torch.zeros_like(v1))))  # undefined, not inf
    batched = relative_change(torch.stack([2 * v1, v2]), torch.stack([v1, v2]))
    assert batched.tolist() == [1.0, 0.0]
    # n̄ = (3 + 5)/2 = 4; a state delta of norm 2 is half a mean task vector
    assert effective_scale(2.0, [3.0, 5.0]) == 0.5
    per_tensor = effective_scale(torch.tensor([2.0, 1.0]), torch.tensor([[3.0, 5.0], [1.0, 1.0]]))
    assert per_tensor.tolist() == [0.5, 1.0]
    assert math.isnan(effective_scale(1.0, [0.0]))
    with pytest.raises(ValueError):
        effective_scale(1.0, [])
    with pytest.raises(ValueError):
        plain_sum([v1], [1.0, 2.0])


def test_aggregate_by_family():
    values = {
        "model.layers.0.self_attn.q_proj.weight": 0.1,
        "model.layers.0.self_attn.v_proj.weight": 0.3,
        "model.layers.0.mlp.down_proj.weight": 0.5,
        "model.layers.1.mlp.up_proj.weight": math.nan,  # undefined: left out
    }
    assert aggregate_by_family(values) == pytest.approx({"mean": 0.3, "attention": 0.2, "mlp": 0.5})
    assert aggregate_by_family({}) == {}


def test_gcwm_records_against_independent_computations():
    deltas = [delta((2, 24, 16), seed=s) for s in (1, 2)]
    weights = [1.0, 0.5]
    s = deltas[0] + 0.5 * deltas[1]
    # plain branch only: m = m_plain = adam_merge(v_i)
    plain = GCWMParams(alpha_min=0.0, alpha_max=0.0, iters=40, lr=1e-4)
    merged, stats = gcwm_merge(deltas, weights, plain, diagnostics=True)
    by_solver = adam_merge(deltas, weights, lr=1e-4, iters=40)
    start = deltas[0] + deltas[1]  # m_0 = Σ u_i (unweighted, METHOD §2.6)
    expected_dev = (by_solver - s).flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1)
    expected_move = (by_solver - start).flatten(1).norm(dim=1) / start.flatten(1).norm(dim=1)
    torch.testing.assert_close(stats["dev_sum"], expected_dev, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats["dev_sum_plain"], expected_dev, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats["displacement_plain"], expected_move, rtol=1e-5, atol=0)
    assert bool(stats["dev_sum_relation"].isnan().all()) and bool(stats["displacement_relation"].isnan().all())
    assert bool((stats["displacement_plain"] > 0).all())

    # relation branch only: dev_sum is the relation branch's
    relation = GCWMParams(gate="none", iters=40, lr=1e-4)
    merged, stats = gcwm_merge(deltas, weights, relation, diagnostics=True)
    torch.testing.assert_close(stats["dev_sum"], stats["dev_sum_relation"], rtol=1e-10, atol=0)
    torch.testing.assert_close(
        stats["dev_sum"], (merged - s).flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1), rtol=1e-10, atol=0
    )
    assert bool(stats["dev_sum_plain"].isnan().all())
    assert bool((stats["displacement_relation"] > 0).all())

    # both branches: m = α m_rel + (1−α) m_plain, so dev_sum ≤ α dev_rel + (1−α) dev_plain
    both = GCWMParams(alpha_min=0.5, alpha_max=0.5, iters=40, lr=1e-4)
    merged, stats = gcwm_merge(deltas, weights, both, diagnostics=True)
    assert stats["branch"].tolist() == [2, 2]
    bound = 0.5 * stats["dev_sum_relation"] + 0.5 * stats["dev_sum_plain"]
    assert bool((stats["dev_sum"] <= bound + 1e-12).all())
    for key in ("dev_sum_plain", "dev_sum_relation", "displacement_plain", "displacement_relation"):
        assert bool(torch.isfinite(stats[key]).all()), key


def test_one_active_delta_records_no_branch():
    u = delta((3, 12, 8), seed=3)
    _, stats = gcwm_merge([u], [1.0], GCWMParams(iters=10), diagnostics=True)
    assert stats["dev_sum"].tolist() == [0.0, 0.0, 0.0]  # the merge is the delta itself
    for key in ("dev_sum_plain", "dev_sum_relation", "displacement_plain", "displacement_relation"):
        assert bool(stats[key].isnan().all()), key
    _, stats = gcwm_merge([u], [2.0], GCWMParams(iters=10), diagnostics=True)  # s = 2u, m = u: halfway
    torch.testing.assert_close(stats["dev_sum"], torch.full((3,), 0.5, dtype=F64))
