"""GCWM building blocks (METHOD §2): the inner objective's gradient and Adam loop, the
conflict and gate, the shared metric, branch skipping, batching, degenerate inputs,
the continual step and the parameter schema."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError
from synthetic_deltas import delta, relative_error

from cpt.geometry import covariance_conflict, geometry_conflict, wasserstein_barycenter
from cpt.merging.gcwm import (
    BRANCH_BOTH,
    BRANCH_PLAIN,
    BRANCH_RELATION,
    GCWMParams,
    adam_merge,
    gcwm_continual_step,
    gcwm_geometry,
    gcwm_merge,
    gcwm_non_target_step,
    inner_gradient,
    inner_objective,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_alpha(c, c0=0.12, s=12.0, lo=0.15, hi=0.95):
    return lo + (hi - lo) / (1.0 + math.exp(-s * (c - c0)))


# ---------------------------------------------------------------- inner objective (§2.6)


def test_closed_form_gradient_is_the_gradient_of_L():
    us = [delta((2, 12, 8), rank=r, seed=s) for r, s in ((2, 1), (3, 2), (5, 3))]
    w = [1.0, 0.5, 2.0]
    m = (sum(us) + 0.01 * torch.randn(2, 12, 8, dtype=F64)).requires_grad_(True)
    inner_objective(m, us, w).sum().backward()
    closed = inner_gradient(m.detach(), us, w)
    by_definition = sum(
        2 * wi * (m.detach() - u) @ u.mT @ u / u.square().sum((-2, -1), keepdim=True) for wi, u in zip(w, us)
    )
    assert torch.allclose(closed, m.grad, rtol=1e-12, atol=1e-15)
    assert torch.allclose(by_definition, m.grad, rtol=1e-12, atol=1e-15)


def torch_adam_iterate(us, w, lr, iters, dtype):
    p = torch.nn.Parameter(sum(us).to(dtype).clone())
    opt = torch.optim.Adam([p], lr=lr)  # betas 0.9/0.999, eps 1e-8, no weight decay
    for _ in range(iters):
        opt.zero_grad()
        inner_objective(p, [u.to(dtype) for u in us], w).sum().backward()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("iters, lr", [(1, 1e-5), (2, 1e-5), (10, 1e-5), (60, 1e-5), (40, 1e-3)])
def test_adam_loop_has_torch_optim_adam_iterates(iters, lr):
    us = [delta((2, 12, 8), rank=r, seed=s) for r, s in ((2, 4), (4, 5))]
    w = [1.0, 1.5]
    m0 = sum(us)
    ref = torch_adam_iterate(us, w, lr, iters, F64)
    ours = adam_merge(us, w, lr=lr, iters=iters, adam_dtype=F64)
    assert relative_error(ours - m0, ref - m0) < 1e-9
    # The default float32 loop stays on the same trajectory.
    ours32 = adam_merge(us, w, lr=lr, iters=iters)
    assert relative_error(ours32 - m0, ref - m0) < 1e-4


def test_fused_and_op_by_op_adam_agree():
    """The fused kernel (torch.optim.Adam(fused=True)) and the op-by-op fallback
    (torch.optim.Adam's single-tensor path) are the same update rule."""
    from cpt.merging.inner_solver import adam_displacement as _adam_displacement

    us = [delta((2, 12, 8), rank=r, seed=s) for r, s in ((2, 14), (4, 15))]
    coef = torch.stack([1.0 / u.square().sum((-2, -1)) for u in us], -1)
    _, fused = _adam_displacement(us, coef, 1e-4, 40, F64, fused=True)
    _, plain = _adam_displacement(us, coef, 1e-4, 40, F64, fused=False)
    assert relative_error(fused, plain) < 1e-12
    # loop_tf32 only affects CUDA matmuls: a no-op on CPU
    _, same = _adam_displacement(us, coef, 1e-4, 40, F64, fused=True, loop_tf32=True)
    assert torch.equal(same, fused)


def test_adam_merge_zero_vectors_and_weights():
    a, b = delta((10, 6), seed=7), delta((10, 6), seed=8)
    z = torch.zeros_like(a)
    base = adam_merge([a, b], [1.0, 2.0], iters=30)
    assert torch.equal(adam_merge([a, z, b], [1.0, 3.0, 2.0], iters=30), base)
    assert torch.equal(adam_merge([a, delta((10, 6), seed=9), b], [1.0, 0.0, 2.0], iters=30), base)
    zeros = adam_merge([z, z], [1.0, 1.0], iters=30)
    assert torch.equal(zeros, torch.zeros_like(zeros))
    # One vector: m_0 = u is the minimiser and the gradient there is exactly 0.
    assert torch.equal(adam_merge([a], [1.0], iters=30), a)
    with pytest.raises(ValueError):
        adam_merge([a, b], [0.0, 0.0])


# ------------------------------------------------------------- conflict and gate (§2.3–4)


def test_single_delta_is_returned_with_zero_conflict():
    a = delta((3, 16, 10), seed=1, dtype=torch.float32)
    m, stats = gcwm_merge([a], [1.0])
    assert relative_error(m, a) < 1e-6
    assert torch.equal(stats["conflict"], torch.zeros(3, dtype=F64))
    assert torch.allclose(stats["alpha"], torch.full((3,), hand_alpha(0.0), dtype=F64), atol=1e-15)
    assert abs(hand_alpha(0.0) - 0.303236) < 1e-6  # 0.15 + 0.8·σ(−1.44)
    assert stats["branch"].tolist() == [BRANCH_BOTH] * 3
    assert stats["active"].tolist() == [1, 1, 1]


def test_conflict_and_gate_by_hand():
    a, b = delta((16, 12), seed=2), delta((16, 12), seed=3)
    _, stats = gcwm_merge([a, b], [1.0, 1.0])
    # n = 2: c is the §1 geometry conflict with the merging defaults.
    gc = float(geometry_conflict(a, b, rank=16, energy=0.9, eps=1e-6))
    assert abs(float(stats["conflict"]) - gc) < 1e-12
    assert abs(float(stats["alpha"]) - hand_alpha(gc)) < 1e-14

    # Identical geometry: c = 0; B vs 4B: d² = 5 tr B − 2·2 tr B, GC = 1/5.
    # Disjoint supports: c ≈ 1, α ≈ α_min + (α_max − α_min) σ(12 · 0.88).
    _, same = gcwm_merge([a, a], [1.0, 1.0])
    assert float(same["conflict"]) < 1e-8
    _, scaled = gcwm_merge([a, 2 * a], [1.0, 1.0])
    assert abs(float(scaled["conflict"]) - 0.2) < 1e-4  # ε ridge aside
    left = torch.zeros(16, 12, dtype=F64)
    right = torch.zeros(16, 12, dtype=F64)
    left[:, :6] = delta((16, 6), seed=4)
    right[:, 6:] = delta((16, 6), seed=5)
    _, far = gcwm_merge([left, right], [1.0, 1.0])
    assert float(far["conflict"]) > 0.95  # 1 − O(√ε · Σ s / tr B) with the ε ridge
    assert abs(float(far["alpha"]) - hand_alpha(float(far["conflict"]))) < 1e-14

    # Custom gate parameters.
    p = GCWMParams(gate_threshold=0.3, gate_sharpness=5.0, alpha_min=0.2, alpha_max=0.7)
    _, st = gcwm_merge([a, b], [1.0, 1.0], p)
    assert abs(float(st["alpha"]) - hand_alpha(gc, 0.3, 5.0, 0.2, 0.7)) < 1e-14


def test_conflict_is_pair_weighted_mean():
    ds = [delta((14, 10), rank=3, seed=s) for s in (10, 11, 12)]
    w = [1.0, 0.5, 2.0]
    _, stats = gcwm_merge(ds, w)
    geo = gcwm_geometry(ds, w)
    num = num_pair = den = 0.0
    for i in range(3):
        for j in range(i + 1, 3):
            # GC of B_i, B_j on the union basis of the whole set (METHOD §2.3) ...
            gc = covariance_conflict(geo.covariances[:, i], geo.covariances[:, j], dims=geo.union_rank)
            num += w[i] * w[j] * float(gc)
            # ... which differs from the pair's own §1 conflict only by the ε ridge on the
            # extra union dimensions (relative ~ε·k/tr B)
            num_pair += w[i] * w[j] * float(geometry_conflict(ds[i], ds[j], rank=16, energy=0.9))
            den += w[i] * w[j]
    assert abs(float(stats["conflict"]) - num / den) < 1e-14
    assert abs(float(stats["conflict"]) - num_pair / den) < 1e-4


def test_gate_none_means_relation_branch_only():
    a, b = delta((2, 16, 12), seed=20), delta((2, 16, 12), seed=21)
    m, stats = gcwm_merge([a, b], [1.0, 1.0], GCWMParams(gate="none"))
    assert torch.equal(stats["alpha"], torch.ones(2, dtype=F64))
    assert stats["branch"].tolist() == [BRANCH_RELATION] * 2
    m_rel, _ = gcwm_merge([a, b], [1.0, 1.0], GCWMParams(alpha_min=1.0, alpha_max=1.0))
    assert torch.equal(m, m_rel)


def test_branch_skipping_thresholds_and_mixture():
    a, b = delta((16, 12), seed=30), delta((16, 12), seed=31)
    fixed = lambda x, **kw: GCWMParams(alpha_min=x, alpha_max=x, **kw)
    m_plain, st = gcwm_merge([a, b], [1.0, 1.0], fixed(0.05))  # α ≤ 0.05: plain only
    assert int(st["branch"]) == BRANCH_PLAIN
    assert torch.allclose(m_plain, adam_merge([a, b], [1.0, 1.0]), rtol=0, atol=1e-12)
    m_rel, st = gcwm_merge([a, b], [1.0, 1.0], fixed(0.95))  # α ≥ 0.95: relation only
    assert int(st["branch"]) == BRANCH_RELATION
    assert float(st["alpha"]) == 0.95
    m_mix, st = gcwm_merge([a, b], [1.0, 1.0], fixed(0.3))
    assert int(st["branch"]) == BRANCH_BOTH
    assert torch.allclose(m_mix, 0.3 * m_rel + 0.7 * m_plain, rtol=0, atol=1e-12)
    assert relative_error(m_rel, m_plain) > 1e-4  # the branches really differ
    _, st = gcwm_merge([a, b], [1.0, 1.0], fixed(0.2, skip_tol=0.25))
    assert int(st["branch"]) == BRANCH_PLAIN


# ------------------------------------------------------------------- shared metric (§2.2)


def test_metric_mean_and_barycenter():
    ds = [delta((2, 14, 10), rank=3, seed=s) for s in (40, 41, 42)]
    w = [1.0, 0.5, 2.0]
    what = torch.tensor(w, dtype=F64) / sum(w)
    mean = gcwm_geometry(ds, w, GCWMParams(metric="mean"))
    expect = (what[None, :, None, None] * mean.covariances).sum(1)
    assert torch.allclose(mean.metric, expect, rtol=1e-14, atol=1e-18)
    assert mean.bary_iters.tolist() == [0, 0]
    bary = gcwm_geometry(ds, w, GCWMParams())
    ref, _ = wasserstein_barycenter(bary.covariances, torch.tensor(w, dtype=F64), dims=bary.union_rank)
    assert torch.allclose(bary.metric, ref, rtol=1e-12, atol=1e-16)
    assert relative_error(bary.metric, mean.metric) > 1e-3
    assert torch.equal(mean.conflict, bary.conflict)  # the metric does not enter c
    m_mean, st = gcwm_merge(ds, w, GCWMParams(metric="mean"))
    m_bary, _ = gcwm_merge(ds, w)
    assert st["bary_iters"].tolist() == [0, 0]
    assert torch.isfinite(m_mean).all() and relative_error(m_mean, m_bary) > 1e-7


# ------------------------------------------------------------- batching, degenerate input


def test_batched_equals_unbatched():
    a = delta((3, 18, 12), rank=3, seed=50, dtype=torch.float32)
    b = delta((3, 18, 12), rank=5, seed=51, dtype=torch.float32)
    b[1] = 0.0  # element 1 has one active delta
    p = GCWMParams()
    m, stats = gcwm_merge([a, b], [1.0, 2.0], p)
    for i in range(3):
        mi, si = gcwm_merge([a[i], b[i]], [1.0, 2.0], p)
        assert relative_error(m[i], mi) < 1e-6
        for key in ("conflict", "alpha"):
            assert abs(float(stats[key][i]) - float(si[key])) < 1e-12
        for key in ("union_rank", "branch", "bary_iters", "active"):
            assert int(stats[key][i]) == int(si[key])
    assert stats["active"].tolist() == [2, 1, 2]
    assert float(stats["conflict"][1]) == 0.0
    # leading dims are kept
    m4, s4 = gcwm_merge([a.reshape(3, 1, 18, 12), b.reshape(3, 1, 18, 12)], [1.0, 2.0], p)
    assert m4.shape == (3, 1, 18, 12) and s4["norm_inputs"].shape == (3, 1, 2)
    assert s4["conflict"].shape == (3, 1)
    assert relative_error(m4.reshape(3, 18, 12), m) < 1e-6


def test_zero_deltas_are_dropped():
    a, b = delta((16, 12), seed=60), delta((16, 12), seed=61)
    z = torch.zeros_like(a)
    m, st = gcwm_merge([a, b], [1.0, 2.0])
    mz, stz = gcwm_merge([a, z, b], [1.0, 5.0, 2.0])
    assert torch.equal(mz, m)
    assert torch.equal(stz["conflict"], st["conflict"])
    assert int(stz["active"]) == 2 and float(stz["norm_inputs"][1]) == 0.0
    # weight 0 removes a (non-zero) delta from the set
    mw, stw = gcwm_merge([a, delta((16, 12), seed=62), b], [1.0, 0.0, 2.0])
    assert torch.equal(mw, m) and float(stw["norm_inputs"][1]) > 0
    # all zero: m = 0, finite stats
    m0, st0 = gcwm_merge([z, z], [1.0, 1.0])
    assert torch.equal(m0, z)
    for value in st0.values():
        assert torch.isfinite(value.double()).all()
    assert float(st0["conflict"]) == 0.0 and int(st0["union_rank"]) == 0
    with pytest.raises(ValueError):
        gcwm_merge([a, b], [0.0, 0.0])
    with pytest.raises(ValueError):
        gcwm_merge([a, b[:8]], [1.0, 1.0])


# ------------------------------------------------------------------ continual step (§2.8)


def test_continual_step_active_sets_and_increments():
    taus = [delta((2, 16, 12), rank=3, seed=70 + t, dtype=torch.float32) for t in range(3)]
    p = GCWMParams(decay=0.5)
    m1, inc1, _st1 = gcwm_continual_step(1, taus[0], None, None, p)
    assert relative_error(m1, taus[0]) < 1e-6  # [τ_1] alone
    assert torch.allclose(inc1, 0.2 * m1)
    m2, inc2, st2 = gcwm_continual_step(2, taus[1], m1, None, p)
    ref2, _ = gcwm_merge([m1, taus[1]], [1.0, 1.0], p)
    assert torch.equal(m2, ref2)
    assert torch.allclose(inc2, 0.1 * (m2 - m1))  # c_2 = 0.2 · 0.5
    assert float(st2["step_coef"]) == pytest.approx(0.1)
    pw = GCWMParams(old_weight=2.0, new_weight=0.5)
    m2w, _, _ = gcwm_continual_step(2, taus[1], m1, None, pw)
    assert torch.equal(m2w, gcwm_merge([m1, taus[1]], [2.0, 0.5], pw)[0])

    ph = GCWMParams(memory="all_history", memory_size=2)
    m3, inc3, _ = gcwm_continual_step(3, taus[2], m2, taus[:2], ph)
    assert torch.equal(m3, gcwm_merge([taus[1], taus[2]], [1.0, 1.0], ph)[0])
    assert torch.allclose(inc3, 0.2 * (m3 - m2))
    m3, _, _ = gcwm_continual_step(3, taus[2], m2, [taus[1]], ph)  # only the window kept
    assert torch.equal(m3, gcwm_merge([taus[1], taus[2]], [1.0, 1.0], ph)[0])
    pa = GCWMParams(memory="all_history")
    m3a, _, st = gcwm_continual_step(3, taus[2], m2, taus[:2], pa)
    assert torch.equal(m3a, gcwm_merge(taus, [1.0, 1.0, 1.0], pa)[0])
    assert st["norm_inputs"].shape == (2, 3)

    with pytest.raises(ValueError):  # m_{t−1} is needed for t > 1
        gcwm_continual_step(2, taus[1], None, None, p)
    with pytest.raises(ValueError):  # m_0 is absent
        gcwm_continual_step(1, taus[0], m1, None, p)
    with pytest.raises(ValueError):  # history must not include τ_t
        gcwm_continual_step(2, taus[1], m1, taus[:2], pa)
    with pytest.raises(ValueError):  # history too short
        gcwm_continual_step(3, taus[2], m2, taus[1:2], pa)


def test_non_target_options():
    tau, prev = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.equal(gcwm_non_target_step(2, tau, prev), torch.zeros(5, 3))
    ta = gcwm_non_target_step(3, tau, prev, GCWMParams(non_target="task_arithmetic", decay=0.5))
    assert torch.allclose(ta, prev + 0.05 * tau)
    avg = gcwm_non_target_step(3, tau, prev, GCWMParams(non_target="average"))
    assert torch.allclose(avg, (2 * prev + tau) / 3)


# --------------------------------------------------------------------------- parameters


METHOD_DEFAULTS = {
    "rank": 16,
    "energy": 0.9,
    "eps": 1e-6,
    "metric": "barycenter",
    "bary_iters": 50,
    "bary_tol": 1e-5,
    "gate": "conflict",
    "gate_threshold": 0.12,
    "gate_sharpness": 12.0,
    "alpha_min": 0.15,
    "alpha_max": 0.95,
    "skip_tol": 0.05,
    "iters": 100,
    "lr": 1e-5,
    "eig_floor": 0.0,
    "memory": "current_anchor",
    "memory_size": -1,
    "old_weight": 1.0,
    "new_weight": 1.0,
    "step_coef": 0.2,
    "decay": 1.0,
    "non_target": "base",
}
#: cpt's extensions beyond METHOD's table, off by default.
EXTENSIONS = {"history_rank": -1}


def test_params_names_and_defaults_are_methods():
    from dataclasses import asdict

    assert asdict(GCWMParams()) == {**METHOD_DEFAULTS, **EXTENSIONS}
    adapter = TypeAdapter(GCWMParams)
    assert adapter.validate_python({}) == GCWMParams()
    assert adapter.validate_python({"metric": "mean", "memory": "all_history"}).metric == "mean"


@pytest.mark.parametrize(
    "bad",
    [
        {"metric": "geodesic"},
        {"gate": "always"},
        {"memory": "last"},
        {"non_target": "expert"},
        {"rank": 0},
        {"energy": 1.5},
        {"eps": 0.0},
        {"alpha_min": 0.9, "alpha_max": 0.5},
        {"skip_tol": 0.6},
        {"memory_size": 0},
        {"history_rank": 0},
        {"iters": -1},
        {"eps": math.inf},
        {"gate_threshold": math.nan},
        {"new_weight": 0.0},
        {"step_coef": math.inf},
        {"rnak": 3},
    ],
)
def test_bad_params_are_rejected(bad):
    with pytest.raises(ValidationError):
        TypeAdapter(GCWMParams).validate_python(bad)
    with pytest.raises(ValueError):  # direct construction validates too (pydantic's ValidationError is a ValueError)
        GCWMParams(**bad)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"rank": 0}, "rank: Input should be greater than or equal to 1 (strategy 'gcwm')"),
        ({"eps": math.inf}, "eps: Input should be a finite number (strategy 'gcwm')"),
        ({"memory_size": 0}, "memory_size: must be -1 (off) or >= 1, got 0 (strategy 'gcwm')"),
        ({"alpha_min": 0.9, "alpha_max": 0.5}, "alpha_min (0.9) must be <= alpha_max (0.5)"),
        (
            {"step_coef": "nrm"},
            "step_coef: must be a number in (0, 1] or 'norm', got 'nrm' (did you mean 'norm'?) (strategy 'gcwm')",
        ),
    ],
)
def test_bad_recipe_params_are_one_line_naming_the_field(bad, message):
    from cpt.errors import CptError
    from cpt.strategies import get_strategy

    with pytest.raises(CptError) as caught:
        get_strategy("gcwm").make_params(bad)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------------------ devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    a = delta((4, 64, 32), seed=80, dtype=torch.float32)
    b = delta((4, 64, 32), seed=81, dtype=torch.float32)
    m_cpu, s_cpu = gcwm_merge([a, b], [1.0, 1.0])
    m_gpu, s_gpu = gcwm_merge([a.cuda(), b.cuda()], [1.0, 1.0])
    assert m_gpu.device.type == "cuda"
    assert relative_error(m_gpu.cpu(), m_cpu) < 1e-5
    assert torch.allclose(s_gpu["conflict"].cpu(), s_cpu["conflict"], atol=1e-6)
