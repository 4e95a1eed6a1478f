"""GCWM's exact shortcuts (issue 19 item 6): what is known exactly is not computed, and
the result equals the long path (``exact_shortcuts=False``) to float rounding."""

from __future__ import annotations

import pytest
import torch
from synthetic_deltas import delta, relative_error

import cpt.merging.gcwm.merge as gcwm_merge_module
from cpt.merging.gcwm import GCWMParams, gcwm_continual_step, gcwm_merge
from cpt.merging.inner_solver import adam_displacement

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def solve_calls(monkeypatch):
    """Counts the inner solves gcwm_merge runs."""
    calls = []
    real = gcwm_merge_module.adam_displacement

    def counting(vectors, *args, **kwargs):
        calls.append(vectors[0].shape[0])
        return real(vectors, *args, **kwargs)

    monkeypatch.setattr(gcwm_merge_module, "adam_displacement", counting)
    return calls


PARAMS = {
    "defaults (both branches)": GCWMParams(iters=30),
    "gate none (relation only)": GCWMParams(gate="none", iters=30),
    "plain only": GCWMParams(alpha_min=0.0, alpha_max=0.02, iters=30),
    "metric mean": GCWMParams(metric="mean", iters=30),
}


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 1e-6)])
def test_one_active_delta_is_the_merge(name, dtype, tol, solve_calls):
    params = PARAMS[name]
    u = delta((3, 24, 16), seed=1, dtype=dtype)
    long_path, long_stats = gcwm_merge([u], [1.0], params, exact_shortcuts=False)
    solves_long = len(solve_calls)
    short, short_stats = gcwm_merge([u], [1.0], params)
    assert len(solve_calls) == solves_long, "the shortcut ran an inner solve"
    assert solves_long >= 1
    assert torch.equal(short, u)  # the merge is the delta itself, bit for bit
    assert relative_error(short, long_path) < tol  # and the long path gets there up to rounding
    for key in ("conflict", "alpha", "union_rank", "branch", "active", "norm_inputs"):
        assert torch.equal(short_stats[key], long_stats[key]), key
    assert bool((short_stats["bary_iters"] == 0).all())  # B* = B_1: no fixed point run


def test_zero_weight_and_zero_deltas_leave_one_active_delta(solve_calls):
    u, other = delta((2, 20, 12), seed=2), delta((2, 20, 12), seed=3)
    zero = torch.zeros_like(u)
    short, _ = gcwm_merge([other, u], [0.0, 1.0], GCWMParams(iters=20))  # weight 0: not in the set
    assert torch.equal(short, u)
    short, stats = gcwm_merge([zero, u], [1.0, 1.0], GCWMParams(iters=20))  # zero delta: dropped
    assert torch.equal(short, u) and stats["active"].tolist() == [1, 1]
    assert solve_calls == []


def test_mixed_batch_solves_only_the_elements_with_two_deltas(solve_calls):
    """Element 0 holds two deltas, element 1 one (its other delta is zero there)."""
    first = delta((2, 24, 16), seed=4)
    second = delta((2, 24, 16), seed=5)
    second[1] = 0.0
    params = GCWMParams(iters=40)
    long_path, long_stats = gcwm_merge([first, second], [1.0, 1.0], params, exact_shortcuts=False)
    assert solve_calls and all(size == 2 for size in solve_calls)  # the long path solves both
    solve_calls.clear()
    short, short_stats = gcwm_merge([first, second], [1.0, 1.0], params)
    assert solve_calls and all(size == 1 for size in solve_calls)  # only element 0 is solved
    assert torch.equal(short[1], first[1])
    assert torch.equal(short_stats["alpha"], long_stats["alpha"])  # the same geometry either way
    assert relative_error(short[1], long_path[1]) < 1e-12
    assert relative_error(short[0], long_path[0]) < 1e-12
    assert relative_error(short[0], first[0] + second[0]) > 1e-6  # element 0 did move: a real merge


@pytest.mark.parametrize("memory", ["current_anchor", "all_history"])
def test_continual_step_one_skips_every_solve(memory, solve_calls):
    tau = delta((4, 32, 16), seed=6, dtype=torch.float32)
    params = GCWMParams(memory=memory, iters=25)
    merged_long, inc_long, _ = gcwm_continual_step(1, tau, None, None, params, exact_shortcuts=False)
    solve_calls.clear()
    merged, increment, _ = gcwm_continual_step(1, tau, None, None, params)
    assert solve_calls == []
    assert torch.equal(merged, tau)
    assert torch.equal(increment, 0.2 * tau)
    assert relative_error(merged, merged_long) < 1e-6 and relative_error(increment, inc_long) < 1e-6


def test_window_of_one_at_a_later_step(solve_calls):
    taus = [delta((2, 20, 10), seed=s) for s in (7, 8, 9)]
    params = GCWMParams(memory="all_history", memory_size=1, iters=25)
    previous = taus[1]  # m_2 (any tensor of the shape: it only enters the increment)
    merged, increment, _ = gcwm_continual_step(3, taus[2], previous, [], params)
    assert solve_calls == []
    assert torch.equal(merged, taus[2])
    long_merged, long_increment, _ = gcwm_continual_step(3, taus[2], previous, [], params, exact_shortcuts=False)
    assert relative_error(merged, long_merged) < 1e-12 and relative_error(increment, long_increment) < 1e-10


def test_zero_start_gradient_skips_adam_exactly():
    """Vectors with orthogonal row spaces: m_0 − u_i = u_j with u_j u_iᵀ = 0, so g_0 = 0."""
    g = torch.Generator().manual_seed(10)
    left = torch.randn(3, 12, 4, generator=g, dtype=F64)
    first = torch.zeros(3, 12, 10, dtype=F64)
    second = torch.zeros(3, 12, 10, dtype=F64)
    first[..., :4], second[..., 4:8] = left, torch.randn(3, 12, 4, generator=g, dtype=F64)
    second[2] = delta((12, 10), seed=11)  # element 2: overlapping rows, a real solve
    vectors = [first, second]
    coef = torch.stack([1.0 / v.square().sum((-2, -1)) for v in vectors], -1)
    start, moved = adam_displacement(vectors, coef, 1e-3, 30, F64)
    _, long_moved = adam_displacement(vectors, coef, 1e-3, 30, F64, skip_stationary=False)
    assert torch.equal(start, first + second)
    assert torch.equal(moved[:2], torch.zeros_like(moved[:2]))
    assert torch.equal(long_moved[:2], torch.zeros_like(moved[:2]))  # Adam indeed never moves
    assert moved[2].abs().max() > 0
    assert relative_error(moved[2], long_moved[2]) < 1e-12


def test_a_branch_of_weight_zero_is_never_computed(solve_calls):
    deltas = [delta((2, 16, 12), seed=s) for s in (12, 13)]
    gcwm_merge(deltas, [1.0, 1.0], GCWMParams(gate="none", skip_tol=0.0, iters=10))  # α = 1
    assert len(solve_calls) == 1  # relation only
    solve_calls.clear()
    gcwm_merge(deltas, [1.0, 1.0], GCWMParams(alpha_min=0.0, alpha_max=0.0, skip_tol=0.0, iters=10))  # α = 0
    assert len(solve_calls) == 1  # plain only
