"""LiNeS (METHOD §3.C): the § hand-worked cases, the depth parser, and the TIES base."""

from __future__ import annotations

import re

import pytest
import torch
from test_baselines import close, run_steps, t

from cpt.errors import CptError
from cpt.merging.lines import (
    DEFAULT_LAYER_REGEX,
    Lines,
    LinesParams,
    layer_index,
    lines_scale,
    multitask_alpha,
)
from cpt.strategies import get_strategy

NAMES = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]


def test_registered_with_method_defaults():
    params = get_strategy("lines").make_params({})
    assert (params.beta, params.alpha, params.base, params.layer_regex) == (0.5, "auto", "ta", r"\.layers\.(\d+)\.")
    assert get_strategy("lines").make_params({"alpha": "0.25"}).alpha == 0.25
    with pytest.raises(CptError, match="exactly one group"):
        get_strategy("lines").make_params({"layer_regex": r"layers\.\d+"})
    with pytest.raises(CptError, match="num_layers"):
        get_strategy("lines").make_params({"num_layers": 1})
    with pytest.raises(CptError, match=r"^layer_regex: .* is not a regular expression"):
        get_strategy("lines").make_params({"layer_regex": "("})
    with pytest.raises(ValueError, match="exactly one group"):  # direct construction validates too
        LinesParams(layer_regex="x")


# ---------------------------------------------------------------------------- § test 1
def test_ta_two_steps_hand_worked():
    # L = 3, one one-entry tensor per layer, plus the embedding (outside the blocks: α).
    names = [*NAMES, "model.embed_tokens.weight"]
    base = {n: torch.zeros(1) for n in names}
    tau1 = dict(zip(names, (t(1.0), t(1.0), t(1.0), t(2.0))))
    tau2 = dict(zip(names, (t(1.0), t(-1.0), t(3.0), t(2.0))))
    strategy = Lines(LinesParams(beta=0.3, num_layers=3))
    states, stats, summaries = run_steps(strategy, base, [tau1, tau2], set(NAMES))
    # t = 1: α = 1, λ = (1, 1.15, 1.3).
    close(torch.cat([states[0][n] for n in NAMES]), [1.0, 1.15, 1.3])
    close(states[0]["model.embed_tokens.weight"], [2.0])
    # t = 2: S = (2, 0, 4), α = 1/2, λ = (0.5, 0.65, 0.8) → (1.0, 0, 3.2); the embedding 0.5·4.
    close(torch.cat([states[1][n] for n in NAMES]), [1.0, 0.0, 3.2])
    close(states[1]["model.embed_tokens.weight"], [2.0])
    assert summaries[1]["alpha"] == 0.5 and summaries[1]["layer_scales"] == pytest.approx(
        {"0": 0.5, "1": 0.65, "2": 0.8}
    )
    assert summaries[1]["norm_l1_sum"] == pytest.approx(6.0) == summaries[1]["norm_l1_merged"]
    assert stats[1][NAMES[2]]["layer"] == 2 and stats[1]["model.embed_tokens.weight"]["layer"] == -1


def test_fixed_alpha_and_history_recovery():
    base = {n: torch.zeros(1) for n in NAMES}
    taus = [dict(zip(NAMES, (t(1.0), t(1.0), t(1.0)))), dict(zip(NAMES, (t(1.0), t(-1.0), t(3.0))))]
    states, _, _ = run_steps(Lines(LinesParams(beta=0.3, alpha=0.2, num_layers=3)), base, taus, set(NAMES))
    close(torch.cat([states[1][n] for n in NAMES]), [0.4, 0.0, 2.0])  # λ = (0.2, 0.35, 0.5)·(2, 0, 4)
    # Without the kept S_1, it is recovered exactly from θ_1 and α_1 = 1.
    from cpt.merging.pipeline import TensorBatch

    strategy = Lines(LinesParams(beta=0.3, num_layers=3))
    state = torch.stack([states[0][n] for n in NAMES]) * 0 + t(1.0, 1.15, 1.3)[:, None]
    tau = torch.stack([taus[1][n] for n in NAMES])

    class Source:
        def iterate(self):
            return iter(())

    strategy.begin_step(2, Source(), {"alpha": 1.0})
    result = strategy.merge(TensorBatch(NAMES, True, 2, torch.zeros(3, 1), state, tau, tau, {"task_sum": None}, {}))
    close(result.state[:, 0], [1.0, 0.0, 3.2])
    assert all(s["recovered_from_state"] for s in result.stats)


# ---------------------------------------------------------------------------- § test 2
def test_ties_alpha_rule_hand_worked():
    # Given M_2 = (1, 0, 2) and S_2 = (2, 0, 4): α = ½·6/3 = 1.0 → λ = (1, 1.15, 1.3) → (1.0, 0, 2.6).
    alpha = multitask_alpha(2, 6.0, 3.0)
    assert alpha == 1.0
    merged = [1.0, 0.0, 2.0]
    assert [lines_scale(layer, 3, alpha, 0.3) * m for layer, m in zip(range(3), merged)] == pytest.approx(
        [1.0, 0.0, 2.6]
    )
    assert multitask_alpha(3, 5.0, 5.0) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------- § test 3
def test_layer_regex():
    pattern = re.compile(DEFAULT_LAYER_REGEX)
    assert layer_index("model.layers.10.mlp.down_proj.weight", pattern) == 10
    # The reference's first ".{i}." substring match would find ".1." (the expert) in a MoE name.
    assert layer_index("model.layers.10.mlp.experts.1.down_proj.weight", pattern) == 10
    assert layer_index("model.embed_tokens.weight", pattern) is None
    assert lines_scale(None, 30, 0.4, 1.0) == 0.4 and lines_scale(29, 30, 0.4, 1.0) == pytest.approx(1.4)
    with pytest.raises(ValueError, match="at least 2"):
        lines_scale(0, 1, 1.0, 0.5)
    with pytest.raises(ValueError, match="outside"):
        lines_scale(3, 3, 1.0, 0.5)
