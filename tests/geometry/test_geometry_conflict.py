"""Geometry conflict, SAR and the state-relative signal (METHOD §1)."""

from __future__ import annotations

import math

import pytest
import torch

from cpt.geometry import (
    ANALYSIS_DEFAULTS,
    MERGING_DEFAULTS,
    LowRankDelta,
    conflict_from_bases,
    covariance_conflict,
    geometry_conflict,
    right_basis,
    state_relative_geometry,
    subspace_alignment_ratio,
)

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def low_rank_plus_noise(m, n, signal_rank=6, noise=1e-3, seed=0):
    g = gen(seed)
    b = torch.randn(m, signal_rank, generator=g, dtype=F64)
    a = torch.randn(signal_rank, n, generator=g, dtype=F64)
    return 0.05 * (b @ a) / signal_rank**0.5 + noise * torch.randn(m, n, generator=g, dtype=F64)


def with_spectrum(m, n, values, seed=0):
    g = gen(seed)
    k = values.shape[0]
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64)).Q
    return (u * values) @ v.T


def test_defaults_are_the_method_defaults():
    assert ANALYSIS_DEFAULTS == dict(rank=32, energy=0.95, eps=1e-6)
    assert MERGING_DEFAULTS == dict(rank=16, energy=0.9, eps=1e-6)


def test_identical_deltas_have_zero_conflict():
    delta = low_rank_plus_noise(80, 60, seed=1)
    assert abs(float(geometry_conflict(delta, delta))) < 1e-12
    assert abs(float(geometry_conflict(delta.float(), delta.float()))) < 1e-6


def test_orthogonal_row_spaces_give_conflict_near_one():
    # Row spaces in disjoint coordinate blocks. With singular values s and ridge ε the
    # covariances commute and GC = Σ (√(s²+ε) − √ε)² / (Σ s² + 2kε)
    #   ≥ 1 − 2√ε Σ s / Σ s² − 2kε / Σ s²  > 0.99 here.
    g = gen(2)
    a = torch.zeros(50, 40, dtype=F64)
    b = torch.zeros(50, 40, dtype=F64)
    a[:, :6] = torch.randn(50, 6, generator=g, dtype=F64) * 0.2
    b[:, 20:25] = torch.randn(50, 5, generator=g, dtype=F64) * 0.2
    eps = 1e-6
    gc = float(geometry_conflict(a, b, rank=32, energy=1.0, eps=eps))
    s = torch.cat([torch.linalg.svdvals(a)[:6], torch.linalg.svdvals(b)[:5]])
    k = 11
    closed = float(((s**2 + eps).sqrt() - math.sqrt(eps)).pow(2).sum() / ((s**2).sum() + 2 * k * eps))
    assert gc == pytest.approx(closed, rel=1e-10)
    bound = 1 - 2 * math.sqrt(eps) * float(s.sum() / (s**2).sum()) - 2 * k * eps / float((s**2).sum())
    assert gc >= bound > 0.99


def test_commuting_covariances_closed_form():
    a = torch.tensor([1.0, 0.5, 1e-3, 0.0], dtype=F64)
    b = torch.tensor([0.2, 0.5, 2.0, 0.3], dtype=F64)
    expected = ((a.sqrt() - b.sqrt()) ** 2).sum() / (a.sum() + b.sum())
    got = covariance_conflict(torch.diag(a), torch.diag(b))
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
    assert torch.isnan(covariance_conflict(torch.zeros(3, 3), torch.zeros(3, 3)))


def test_symmetry_and_scaling_invariance():
    a = low_rank_plus_noise(90, 70, signal_rank=5, noise=5e-3, seed=3)
    b = low_rank_plus_noise(90, 70, signal_rank=4, noise=5e-3, seed=4)
    eps = 1e-6
    gc = geometry_conflict(a, b, eps=eps)
    assert 0.05 < float(gc) < 0.999
    torch.testing.assert_close(geometry_conflict(b, a, eps=eps), gc, rtol=1e-10, atol=0)
    # exact invariance when the ridge scales with the covariances (ε → c² ε) ...
    c = 7.0
    torch.testing.assert_close(geometry_conflict(c * a, c * b, eps=c**2 * eps), gc, rtol=1e-9, atol=0)
    # ... and, with the fixed ridge of METHOD, invariance up to O(√ε / s)
    assert abs(float(geometry_conflict(c * a, c * b, eps=eps)) - float(gc)) < 5e-3


def test_eig_floor_lowers_conflict_for_small_updates():
    # METHOD §1: a 64×32 tensor with singular values ~0.05 — the ε floor inside the roots
    # biases the conflict far downward (the reference reported 0.45 for an exact 0.81).
    def small(seed):
        g = gen(seed)
        u = torch.linalg.qr(torch.randn(64, 4, generator=g, dtype=F64)).Q
        v = torch.linalg.qr(torch.randn(32, 4, generator=g, dtype=F64)).Q
        s = 0.05 * (1 + 0.1 * torch.rand(4, generator=g, dtype=F64))
        return (u * s) @ v.T

    a, b = small(5), small(6)
    exact = float(geometry_conflict(a, b, eps=1e-6))
    floored = float(geometry_conflict(a, b, eps=1e-6, eig_floor=1e-6))
    assert exact > 0.6
    assert floored < 0.5 * exact


def test_conflict_is_nan_for_a_zero_delta():
    a = low_rank_plus_noise(40, 30, seed=7)
    zero = torch.zeros(40, 30, dtype=F64)
    assert torch.isnan(geometry_conflict(a, zero))
    assert torch.isnan(geometry_conflict(zero, a))


def test_subspace_alignment_ratio():
    g = gen(8)
    a = torch.zeros(30, 20, dtype=F64)
    a[:, :4] = torch.randn(30, 4, generator=g, dtype=F64)
    b = torch.zeros(30, 20, dtype=F64)
    b[:, 2:6] = torch.randn(30, 4, generator=g, dtype=F64)
    basis_b = right_basis(b, 8, 1.0)
    # Δ_a V_b keeps exactly columns 2 and 3 of a (V_b spans coordinates 2..5)
    expected = torch.linalg.matrix_norm(a[:, 2:4]) / torch.linalg.matrix_norm(a)
    torch.testing.assert_close(subspace_alignment_ratio(a, basis_b), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(subspace_alignment_ratio(a, basis_b.basis), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        subspace_alignment_ratio(a, right_basis(a, 8, 1.0)), torch.tensor(1.0, dtype=F64), rtol=1e-12, atol=0
    )
    assert torch.isnan(subspace_alignment_ratio(torch.zeros(30, 20, dtype=F64), basis_b))
    assert float(subspace_alignment_ratio(a, right_basis(torch.zeros(30, 20, dtype=F64), 8, 1.0))) == 0.0


def lora(m, n, r, seed, scale):
    g = gen(seed)
    return LowRankDelta(
        torch.randn(m, r, generator=g, dtype=F64) / m**0.5,
        torch.randn(r, n, generator=g, dtype=F64) / n**0.5,
        scale,
    )


def test_low_rank_path_equals_dense_path():
    # 300 × 280 with rank 8: the dense side takes the randomized solver ("auto").
    la, lb = lora(300, 280, 8, 9, 2.0), lora(300, 280, 6, 10, 0.5)
    da, db = la.to_dense(), lb.to_dense()
    kw = dict(rank=8, energy=0.9)
    torch.testing.assert_close(geometry_conflict(la, lb, **kw), geometry_conflict(da, db, **kw), rtol=1e-9, atol=0)
    torch.testing.assert_close(geometry_conflict(la, db, **kw), geometry_conflict(da, db, **kw), rtol=1e-9, atol=0)
    lr = state_relative_geometry(la, lb, **kw)
    dn = state_relative_geometry(da, db, **kw)
    assert lr.keys() == dn.keys()
    for key in lr:
        if lr[key].is_floating_point():
            torch.testing.assert_close(lr[key], dn[key], rtol=1e-9, atol=0)
        else:
            assert torch.equal(lr[key], dn[key])
    torch.testing.assert_close(
        subspace_alignment_ratio(la, right_basis(lb, **kw)),
        subspace_alignment_ratio(da, right_basis(db, **kw)),
        rtol=1e-9,
        atol=0,
    )


def test_state_relative_geometry_values():
    state = low_rank_plus_noise(60, 50, signal_rank=4, noise=1e-3, seed=11)
    update = low_rank_plus_noise(60, 50, signal_rank=3, noise=1e-3, seed=12)
    out = state_relative_geometry(state, update, rank=16, energy=0.9)
    assert set(out) == {
        "geometry_conflict",
        "sar_state_to_update",
        "sar_update_to_state",
        "norm_update",
        "norm_state",
        "rank_state",
        "rank_update",
        "union_rank",
    }
    torch.testing.assert_close(out["geometry_conflict"], geometry_conflict(state, update, rank=16, energy=0.9))
    bs, bu = right_basis(state, 16, 0.9), right_basis(update, 16, 0.9)
    gc, k = conflict_from_bases(bs, bu, eps=1e-6)
    torch.testing.assert_close(gc, out["geometry_conflict"], rtol=1e-12, atol=0)
    assert int(k) == int(out["union_rank"])
    torch.testing.assert_close(out["sar_state_to_update"], subspace_alignment_ratio(state, bu))
    torch.testing.assert_close(out["sar_update_to_state"], subspace_alignment_ratio(update, bs))
    torch.testing.assert_close(out["norm_update"], torch.linalg.matrix_norm(update))
    torch.testing.assert_close(out["norm_state"], torch.linalg.matrix_norm(state))
    assert int(out["rank_state"]) == int(bs.ranks) and int(out["rank_update"]) == int(bu.ranks)
    assert int(out["union_rank"]) == int(bs.ranks) + int(bu.ranks)  # generic subspaces
    # t = 1: the state is zero
    first = state_relative_geometry(torch.zeros_like(state), update, rank=16, energy=0.9)
    assert torch.isnan(first["geometry_conflict"]) and torch.isnan(first["sar_state_to_update"])
    assert float(first["sar_update_to_state"]) == 0.0 and int(first["rank_state"]) == 0


@pytest.mark.parametrize("eig_floor", [0.0, 1e-6])
def test_batched_equals_unbatched_with_mixed_ranks_and_a_zero_delta(eig_floor):
    # 300 × 270, rank 8: "auto" takes the randomized solver; the last element has a flat
    # spectrum (exact fallback inside the batch).
    states = torch.stack(
        [
            low_rank_plus_noise(300, 270, signal_rank=2, noise=1e-4, seed=13),
            low_rank_plus_noise(300, 270, signal_rank=7, noise=1e-3, seed=14),
            torch.zeros(300, 270, dtype=F64),
            torch.randn(300, 270, generator=gen(15), dtype=F64) * 1e-2,
        ]
    )
    updates = torch.stack(
        [
            low_rank_plus_noise(300, 270, signal_rank=3, noise=1e-4, seed=16),
            with_spectrum(300, 270, torch.tensor([0.3, 0.2, 0.05], dtype=F64), seed=17),
            low_rank_plus_noise(300, 270, signal_rank=4, noise=1e-3, seed=18),
            low_rank_plus_noise(300, 270, signal_rank=5, noise=1e-3, seed=19),
        ]
    )
    kw = dict(rank=8, energy=0.9, eig_floor=eig_floor)
    batched = state_relative_geometry(states.reshape(2, 2, 300, 270), updates.reshape(2, 2, 300, 270), **kw)
    assert batched["geometry_conflict"].shape == (2, 2)
    assert len(set(batched["union_rank"].flatten().tolist())) >= 3
    for i in range(4):
        single = state_relative_geometry(states[i], updates[i], **kw)
        for key, value in single.items():
            b = batched[key].flatten()[i]
            if value.is_floating_point():
                torch.testing.assert_close(b, value, rtol=1e-10, atol=1e-14, equal_nan=True)
            else:
                assert int(b) == int(value)
    assert torch.isnan(batched["geometry_conflict"][1, 0])
    assert not torch.isnan(batched["geometry_conflict"][1, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():  # pragma: no cover - exercised only where a GPU exists
    state = low_rank_plus_noise(300, 270, signal_rank=5, noise=1e-3, seed=20)
    update = low_rank_plus_noise(300, 270, signal_rank=3, noise=1e-3, seed=21)
    cpu = state_relative_geometry(state, update, rank=8, energy=0.9)
    gpu = state_relative_geometry(state.cuda(), update.cuda(), rank=8, energy=0.9)
    for key in cpu:
        assert gpu[key].device.type == "cuda"
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-8, atol=1e-12)
