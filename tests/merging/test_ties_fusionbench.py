"""TIES ``form: fusionbench`` (METHOD §3) against a transcription of FusionBench's rule.

Reference read with the stored-reference search tool: tanganke/fusion_bench
``fusion_bench/method/opcm/ties_merging.py`` (``ContinualTiesMergingForCLIP.run``: θ_1 = θ0 + λτ_1,
then θ_t = θ_{t−1} + λ·ties_merging([θ_{t−1} − θ0, τ_t]) over ``state_dict_to_vector``) and
``fusion_bench/method/ties_merging/ties_merging_utils.py`` (``topk_values_mask``,
``resolve_sign``/``resolve_zero_signs``, ``disjoint_merge``), config
``config/method/opcm/ties_merging.yaml`` (threshold 20, merge_func sum).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from test_baselines import close, run_steps, t

from cpt.errors import CptError
from cpt.merging.ties import Ties, TiesParams, fusionbench_ties_step
from cpt.strategies import get_strategy


# ---------------------------------------------------------------------------- the transcription
def _state_dict_to_vector(state_dict):
    return torch.cat([value.reshape(-1) for _, value in OrderedDict(sorted(state_dict.items())).items()])


def _vector_to_state_dict(vector, reference):
    out, offset = {}, 0
    for key, value in OrderedDict(sorted(reference.items())).items():
        out[key] = vector[offset : offset + value.numel()].reshape(value.shape)
        offset += value.numel()
    return out


def _topk_values_mask(M, K):
    if K > 1:
        K /= 100
    _, d = M.shape
    k = d - int(d * K)
    kth_values, _ = M.abs().kthvalue(k, dim=1, keepdim=True)
    return M * (M.abs() >= kth_values)


def _resolve_sign(v):
    sign_to_mult = torch.sign(v.sum(dim=0))
    majority_sign = torch.sign(sign_to_mult.sum())
    sign_to_mult[sign_to_mult == 0] = majority_sign
    return sign_to_mult


def _disjoint_merge_sum(v, sign_to_mult):
    rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, v > 0, v < 0)
    return torch.sum(v * rows_to_keep, dim=0)


def fusionbench_continual_ties(base, experts, scaling, threshold):
    """θ_1 … θ_T by FusionBench's continual TIES, on whole state dicts."""
    merged = {k: v.clone() for k, v in base.items()}
    states = []
    for index, expert in enumerate(experts):
        task_vector = {k: expert[k] - base[k] for k in base}
        if index == 0:
            update = task_vector
        else:
            merged_tv = {k: merged[k] - base[k] for k in base}
            checks = torch.vstack([_state_dict_to_vector(merged_tv), _state_dict_to_vector(task_vector)])
            trimmed = _topk_values_mask(checks.clone(), threshold)
            update = _vector_to_state_dict(_disjoint_merge_sum(trimmed, _resolve_sign(trimmed)), base)
        merged = {k: merged[k] + scaling * update[k] for k in base}
        states.append(merged)
    return states


# ---------------------------------------------------------------------------- tests
def test_parameters():
    assert get_strategy("ties").make_params({}).form == "running"
    assert get_strategy("ties").make_params({"form": "fusionbench"}).form == "fusionbench"
    with pytest.raises(CptError, match="majority_sign"):
        get_strategy("ties").make_params({"form": "fusionbench", "majority_sign": "frequency"})


def test_hand_worked_step_with_a_zero_sum_tie():
    # Whole model d = 6 (w: 4, b: 2), density 0.34 → k = int(2.04) = 2: each vector keeps its 3 largest.
    base = {"w": torch.zeros(4), "b": torch.zeros(2)}
    e1 = {"w": t(4.0, -1.0, 2.0, 0.5), "b": t(-3.0, 0.1)}  # P = θ_1 − θ0 = λτ_1 = (2, -.5, 1, .25 | -1.5, .05)
    e2 = {"w": t(-2.0, 3.0, 1.0, -0.2), "b": t(1.5, 0.0)}  # τ_2
    states, stats, summaries = run_steps(
        Ties(TiesParams(density=0.34, scaling=0.5, form="fusionbench")), base, [e1, e2], {"w"}
    )
    close(states[0]["w"], 0.5 * e1["w"])
    # Trim: P keeps (2, 1 | -1.5) [q = 1]; τ_2 keeps (-2, 3 | 1.5) [q = 1.5].
    # Sums: w (0, 3, 1, 0), b (0, 0) → signs (0, +, +, 0 | 0, 0); the elected non-zero signs
    # sum to +2 → zeros become +. Disjoint sums of the positive entries: w (2, 3, 1, 0), b (1.5, 0).
    close(states[1]["w"], 0.5 * e1["w"] + 0.5 * t(2.0, 3.0, 1.0, 0.0))
    close(states[1]["b"], 0.5 * e1["b"] + 0.5 * t(1.5, 0.0))
    assert summaries[1]["majority_sign"] == 1.0 and summaries[1]["threshold_task"] == 1.5
    assert stats[1]["w"]["sign_conflicts"] == pytest.approx(1 / 4)  # entry 0: 2 vs −2
    expected = fusionbench_continual_ties(base, [e1, e2], 0.5, 0.34)
    for name in base:
        close(states[1][name], expected[1][name])


def test_zero_global_majority_keeps_negative_entries():
    # The reference's where(sign > 0, v > 0, v < 0) with sign 0 keeps the negative entries.
    merged, _ = fusionbench_ties_step(t(1.0, -1.0)[None], t(-1.0, 1.0)[None], (0.0, 0.0), 0.0)
    close(merged[0], [-1.0, -1.0])


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_three_steps_match_the_transcription(density):
    generator = torch.Generator().manual_seed(7)
    shapes = {"q": (6, 4), "k": (6, 4), "up": (8, 4), "norm": (4,), "embed": (10, 4)}
    base = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
    experts = [{n: v + 0.1 * torch.randn(v.shape, generator=generator) for n, v in base.items()} for _ in range(3)]
    states, _, _ = run_steps(
        Ties(TiesParams(density=density, scaling=0.3, form="fusionbench")), base, experts, {"q", "k", "up"}
    )
    expected = fusionbench_continual_ties(base, experts, 0.3, density)
    for step in range(3):
        for name in base:
            close(states[step][name], expected[step][name], atol=1e-6)
    # It is not the running form (which would differ from step 2 on).
    running, _, _ = run_steps(Ties(TiesParams(density=density, scaling=0.3)), base, experts, {"q", "k", "up"})
    assert not torch.allclose(running[2]["q"], states[2]["q"])
