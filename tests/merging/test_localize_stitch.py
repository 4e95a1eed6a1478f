"""Localize-and-Stitch (METHOD §3.B): the § hand-worked cases, the exact streamed threshold,
and the continual S/C state against a one-shot stitch."""

from __future__ import annotations

import pytest
import torch
from test_baselines import close, run_steps, t

from cpt.merging.localize_stitch import (
    LocalizeStitch,
    LocalizeStitchParams,
    stitch,
    stitch_update,
)
from cpt.merging.magnitude import kth_largest_magnitudes
from cpt.strategies import get_strategy


def test_registered_with_method_defaults():
    params = get_strategy("localize_stitch").make_params({})
    assert (params.sparsity, params.scope, params.threshold, params.non_target) == (0.1, "global", "ge", "base")


# ---------------------------------------------------------------------------- § test 1
@pytest.mark.parametrize("rule,merged", [("ge", [0.9, -0.8, 0.55, 0]), ("gt", [0.9, -0.8, 0, 0])])
def test_two_tasks_hand_worked(rule, merged):
    base = {"w": torch.zeros(4), "b": t(1.0)}
    e1 = {"w": t(0.9, -0.1, 0.5, 0.2), "b": t(3.0)}
    e2 = {"w": t(0.3, -0.8, 0.6, 0.05), "b": t(0.0)}
    strategy = LocalizeStitch(LocalizeStitchParams(sparsity=0.5, threshold=rule))
    states, stats, summaries = run_steps(strategy, base, [e1, e2], {"w"})
    close(states[0]["w"], [0.9, 0, 0.5, 0] if rule == "ge" else [0.9, 0, 0, 0])  # m1 = (1,0,1,0) | (1,0,0,0)
    close(states[1]["w"], merged)
    close(states[1]["b"], [1.0])  # non_target: base keeps θ0
    assert summaries[0]["threshold"] == pytest.approx(0.5) and summaries[1]["threshold"] == pytest.approx(0.6)
    if rule == "ge":
        # m2 = (0,1,1,0): C = (1,1,2,0); half of m2 was already claimed; 1 of 3 support entries shared.
        assert stats[1]["w"]["kept_fraction"] == 0.5 and stats[1]["w"]["overlap"] == 0.5
        assert stats[1]["w"]["shared_fraction"] == pytest.approx(1 / 3) and stats[1]["w"]["max_count"] == 2


# ---------------------------------------------------------------------------- § test 2
@pytest.mark.parametrize(
    "scope,merged_a,merged_b", [("global", [0.9, 0.1], [0, 0]), ("per_tensor", [0.9, 0], [0.05, 0])]
)
def test_scope_hand_worked(scope, merged_a, merged_b):
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    expert = {"a": t(0.9, 0.1), "b": t(0.05, 0.02)}
    states, _, _ = run_steps(
        LocalizeStitch(LocalizeStitchParams(sparsity=0.5, scope=scope)), base, [expert], {"a", "b"}
    )
    close(states[0]["a"], merged_a)
    close(states[0]["b"], merged_b)


# ---------------------------------------------------------------------------- § test 3
def _mergebench_stitch(task_vectors, masks):
    """MergeBench's ``Stitcher.get_average_masks`` + ``interpolate_models``, transcribed with its
    indentation: ``output_mask + intersect`` sits after the ``j`` loop, so only the last
    other mask is counted (uiuctml/MergeBench ``localize_utils.py`` L194-212)."""
    total = torch.zeros_like(task_vectors[0])
    for i in range(len(masks)):
        output_mask = masks[i].clone().float()
        for j in range(len(masks)):
            if i == j:
                continue
            intersect = torch.logical_and(masks[i], masks[j])
        output_mask = output_mask + intersect
        reciprocal = torch.where(output_mask == 0, torch.zeros_like(output_mask), 1 / output_mask)
        total += reciprocal * task_vectors[i]
    return total


def test_three_tasks_follow_the_original_not_mergebench():
    masks = [torch.tensor([True, True]), torch.tensor([True, False]), torch.tensor([False, True])]
    taus = [t(1.0, 1.0), t(3.0, 0.0), t(0.0, 5.0)]
    close(stitch(taus, masks), [2.0, 3.0])
    stitched_sum, count = torch.zeros(2), torch.zeros(2)
    for tau, mask in zip(taus, masks):
        stitched_sum, count, delta = stitch_update(stitched_sum, count, tau, mask)
    close(delta, [2.0, 3.0])
    close(_mergebench_stitch(taus, masks), [4.0, 5.5])  # the regression this guards against


# ---------------------------------------------------------------------------- § test 4
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_continual_state_equals_one_shot_stitch(scope):
    generator = torch.Generator().manual_seed(0)
    shapes = {"q": (6, 4), "k": (6, 4), "up": (8, 4), "norm": (4,)}
    base = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
    taus = [{n: torch.randn(s, generator=generator) * (i + 1) for n, s in shapes.items()} for i in range(3)]
    experts = [{n: base[n] + tau[n] for n in shapes} for tau in taus]
    targets = {"q", "k", "up"}
    params = LocalizeStitchParams(sparsity=0.3, scope=scope, non_target="average")
    states, _, _ = run_steps(LocalizeStitch(params), base, experts, targets)
    names = sorted(targets)
    masks = []
    for tau in taus:  # localized independently: top-k of |τ| by sorting
        if scope == "global":
            flat = torch.cat([tau[n].flatten() for n in names]).abs()
            q = flat.sort(descending=True).values[int(0.3 * flat.numel()) - 1]
            masks.append({n: tau[n].abs() >= q for n in names})
        else:
            masks.append(
                {
                    n: tau[n].abs()
                    >= tau[n].abs().flatten().sort(descending=True).values[int(0.3 * tau[n].numel()) - 1]
                    for n in names
                }
            )
    for step in range(1, 4):
        for n in names:
            expected = stitch([tau[n] for tau in taus[:step]], [m[n] for m in masks[:step]])
            close(states[step - 1][n] - base[n], expected, atol=1e-6)
        # non-target "average": the running mean of the task vectors
        close(states[step - 1]["norm"] - base["norm"], sum(tau["norm"] for tau in taus[:step]) / step, atol=1e-6)


# ---------------------------------------------------------------------------- the streamed threshold
def test_kth_largest_is_exact_with_ties_zeros_and_scales():
    generator = torch.Generator().manual_seed(1)
    chunks = [torch.randn(40, 7, generator=generator) * 10.0**p for p in range(-4, 4)]
    chunks.append(t(0.0, 0.0, 1.0, 1.0, -1.0, 1.0))  # ties and zeros
    flat = torch.cat([c.flatten() for c in chunks]).abs()
    ranks = [1, 2, 3, 17, 600, flat.numel() - 1, flat.numel()]
    got = kth_largest_magnitudes(lambda: ((c,) * len(ranks) for c in chunks), ranks)  # one channel per rank
    for rank, value in zip(ranks, got):
        assert value == float(flat.sort(descending=True).values[rank - 1])
    tripled = kth_largest_magnitudes(lambda: ((c, 3 * c) for c in chunks), [lambda size: size // 2] * 2)
    assert tripled[1] == float(
        (3 * torch.cat([c.flatten() for c in chunks])).abs().sort(descending=True).values[flat.numel() // 2 - 1]
    )
    assert kth_largest_magnitudes(lambda: [(t(1.0),)], [0]) == [float("inf")]
    assert kth_largest_magnitudes(lambda: [(t(1.0),)], [2]) == [0.0]
