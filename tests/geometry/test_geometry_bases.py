"""Right bases, LoRA deltas, union basis and projected covariances (METHOD §1)."""

from __future__ import annotations

import pytest
import torch

from cpt.geometry import (
    LowRankDelta,
    apply_right,
    frobenius_norm,
    projected_covariance,
    right_basis,
    union_basis,
)
from cpt.geometry import bases as geometry_bases

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def low_rank_plus_noise(m, n, signal_rank=6, noise=1e-3, seed=0, batch=()):
    g = gen(seed)
    b = torch.randn(*batch, m, signal_rank, generator=g, dtype=F64)
    a = torch.randn(*batch, signal_rank, n, generator=g, dtype=F64)
    return 0.05 * (b @ a) / signal_rank**0.5 + noise * torch.randn(*batch, m, n, generator=g, dtype=F64)


def with_spectrum(m, n, values, seed=0):
    g = gen(seed)
    k = values.shape[0]
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64)).Q
    return (u * values) @ v.T


def dense_reference(delta, rank, energy):
    """Dense float64 SVD and the METHOD §1 truncation rule, written out plainly."""
    _, s, vh = torch.linalg.svd(delta.to(F64), full_matrices=False)
    cum = torch.cumsum(s**2, 0)
    total = (delta.to(F64) ** 2).sum()
    r_energy = int((cum >= energy * total).nonzero()[0]) + 1
    r = min(rank, r_energy)
    return s[:r], vh[:r].T, r


def max_principal_angle(v1, v2):
    cos = torch.linalg.svdvals(v1.T @ v2)
    return float(torch.arccos(cos.min().clamp(max=1.0)))


@pytest.mark.parametrize("method", ["gram", "randomized"])
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_right_basis_matches_dense_svd_on_low_rank_plus_noise(method, shape):
    delta = low_rank_plus_noise(*shape, signal_rank=6, noise=2e-3, seed=1)
    for rank, energy in [(32, 0.95), (16, 0.9), (4, 0.95), (32, 0.999)]:
        s_ref, v_ref, r = dense_reference(delta, rank, energy)
        rb = right_basis(delta, rank, energy, method=method)
        assert int(rb.ranks) == r
        assert rb.basis.shape == (shape[1], r) and rb.basis.dtype == F64
        torch.testing.assert_close(rb.singular_values, s_ref, rtol=1e-6, atol=0)
        assert torch.allclose(rb.squared_norm, (delta**2).sum())
        # the signal directions are well separated from the noise: tight subspace match
        r_sig = min(r, 6)
        assert max_principal_angle(rb.basis[:, :r_sig], v_ref[:, :r_sig]) < 1e-4
        # orthonormal columns
        torch.testing.assert_close(rb.basis.T @ rb.basis, torch.eye(r, dtype=F64), atol=1e-10, rtol=0)


def test_energy_rank_counts_noise_directions_when_the_signal_is_weak():
    # Weak signal: r_E is large, the cap `rank` binds, and directions 7..rank are noise.
    delta = low_rank_plus_noise(300, 260, signal_rank=6, noise=3e-2, seed=2)
    s_ref, v_ref, r = dense_reference(delta, 32, 0.95)
    assert r == 32
    rb = right_basis(delta, 32, 0.95, method="randomized")
    assert int(rb.ranks) == 32
    torch.testing.assert_close(rb.singular_values, s_ref, rtol=1e-6, atol=0)
    cov = (rb.basis * rb.singular_values**2) @ rb.basis.T
    cov_ref = (v_ref * s_ref**2) @ v_ref.T
    assert torch.linalg.matrix_norm(cov - cov_ref) / torch.linalg.matrix_norm(cov_ref) < 1e-6


def test_randomized_on_a_flat_spectrum_falls_back_to_the_exact_answer():
    # Gaussian noise: the top singular values are nearly degenerate; subspace iteration
    # cannot certify them cheaply, so the exact Gram path must take over.
    g = gen(3)
    delta = torch.randn(320, 288, generator=g, dtype=F64)
    d = delta.reshape(1, 320, 288)
    sq = (delta**2).sum().reshape(1)
    _, _, certified, iters = geometry_bases._randomized_right_basis(d, 32, 0.95, 64, 16, 1e-4, 0, sq)
    assert not bool(certified[0]) and iters < 16  # given up early, not after 16 iterations
    s_ref, v_ref, r = dense_reference(delta, 32, 0.95)
    rb = right_basis(delta, 32, 0.95, method="randomized")
    torch.testing.assert_close(rb.singular_values, s_ref, rtol=1e-10, atol=0)
    assert max_principal_angle(rb.basis, v_ref) < 1e-6


def test_randomized_on_a_power_law_spectrum_certifies_and_matches():
    values = torch.arange(1, 201, dtype=F64) ** -0.5
    delta = with_spectrum(400, 300, values, seed=4)
    d = delta.reshape(1, 400, 300)
    sq = (delta**2).sum().reshape(1)
    _, _, certified, _ = geometry_bases._randomized_right_basis(d, 32, 0.95, 64, 16, 1e-4, 0, sq)
    assert bool(certified[0])
    s_ref, v_ref, r = dense_reference(delta, 32, 0.95)
    rb = right_basis(delta, 32, 0.95, method="randomized")
    torch.testing.assert_close(rb.singular_values, values[:32], rtol=1e-6, atol=0)
    cov = (rb.basis * rb.singular_values**2) @ rb.basis.T
    cov_ref = (v_ref * s_ref**2) @ v_ref.T
    assert torch.linalg.matrix_norm(cov - cov_ref) / torch.linalg.matrix_norm(cov_ref) < 1e-5


def test_randomized_in_float32_matches_the_float64_svd():
    delta = low_rank_plus_noise(400, 300, signal_rank=6, noise=1e-3, seed=5)
    s_ref, v_ref, r = dense_reference(delta, 32, 0.95)
    rb = right_basis(delta.float(), 32, 0.95, method="randomized")
    assert int(rb.ranks) == r and rb.basis.dtype == F64
    torch.testing.assert_close(rb.singular_values, s_ref, rtol=2e-6, atol=0)
    assert max_principal_angle(rb.basis, v_ref) < 1e-3


def test_zero_delta_has_rank_zero_and_exact_rank_is_respected():
    zero = torch.zeros(50, 40, dtype=F64)
    for method in ["gram", "randomized"]:
        rb = right_basis(zero, 8, 0.9, method=method)
        assert int(rb.ranks) == 0 and rb.basis.shape == (40, 0)
    rank3 = with_spectrum(50, 40, torch.tensor([3.0, 2.0, 1.0], dtype=F64), seed=6)
    for method in ["gram", "randomized"]:
        rb = right_basis(rank3, 8, 1.0, method=method)
        assert int(rb.ranks) == 3
        torch.testing.assert_close(rb.singular_values, torch.tensor([3.0, 2.0, 1.0], dtype=F64))


def test_right_basis_rejects_bad_arguments():
    with pytest.raises(ValueError):
        right_basis(torch.zeros(4, 4), 0, 0.9)
    with pytest.raises(ValueError):
        right_basis(torch.zeros(4, 4), 4, 1.5)
    with pytest.raises(ValueError):
        right_basis(torch.zeros(4), 4, 0.9)


@pytest.mark.parametrize("method", ["gram", "randomized"])
def test_batched_equals_unbatched_with_mixed_ranks_and_a_zero_delta(method):
    deltas = torch.stack(
        [
            low_rank_plus_noise(120, 100, signal_rank=2, noise=1e-4, seed=7),
            low_rank_plus_noise(120, 100, signal_rank=9, noise=1e-4, seed=8),
            torch.zeros(120, 100, dtype=F64),
            low_rank_plus_noise(120, 100, signal_rank=5, noise=3e-2, seed=9),
        ]
    ).reshape(2, 2, 120, 100)
    batched = right_basis(deltas, 12, 0.9, method=method)
    assert batched.basis.shape[:2] == (2, 2)
    r_max = batched.basis.shape[-1]
    assert r_max == int(batched.ranks.max())
    ranks = set()
    for i in range(2):
        for j in range(2):
            single = right_basis(deltas[i, j], 12, 0.9, method=method)
            r = int(single.ranks)
            ranks.add(r)
            assert int(batched.ranks[i, j]) == r
            torch.testing.assert_close(
                batched.singular_values[i, j, :r], single.singular_values, atol=1e-12, rtol=1e-10
            )
            # padding is exactly zero
            assert bool((batched.singular_values[i, j, r:] == 0).all())
            assert bool((batched.basis[i, j, :, r:] == 0).all())
            # same vectors up to sign
            dots = (batched.basis[i, j, :, :r] * single.basis).sum(0).abs()
            torch.testing.assert_close(dots, torch.ones(r, dtype=F64), atol=1e-10, rtol=0)
    assert 0 in ranks and len(ranks) >= 3


def random_lora(m, n, r, seed, scale=0.5, batch=()):
    g = gen(seed)
    b = torch.randn(*batch, m, r, generator=g, dtype=F64) / m**0.5
    a = torch.randn(*batch, r, n, generator=g, dtype=F64) / n**0.5
    return LowRankDelta(b, a, scale)


def test_low_rank_delta_basis_norm_and_product_match_the_dense_path():
    lora = random_lora(300, 280, 8, seed=10, scale=-2.0)
    dense = lora.to_dense()
    for rank, energy in [(32, 0.95), (4, 0.95), (16, 0.5)]:
        lr = right_basis(lora, rank, energy)
        dn = right_basis(dense, rank, energy)
        s_ref, v_ref, r = dense_reference(dense, rank, energy)
        assert int(lr.ranks) == int(dn.ranks) == r
        torch.testing.assert_close(lr.singular_values, s_ref, rtol=1e-10, atol=0)
        torch.testing.assert_close(dn.singular_values, s_ref, rtol=1e-8, atol=0)
        assert max_principal_angle(lr.basis, v_ref) < 1e-7
        assert max_principal_angle(lr.basis, dn.basis) < 1e-7
    torch.testing.assert_close(frobenius_norm(lora), torch.linalg.matrix_norm(dense), rtol=1e-12, atol=0)
    m = torch.randn(280, 5, generator=gen(11), dtype=F64)
    torch.testing.assert_close(apply_right(lora, m), dense @ m, rtol=1e-10, atol=1e-14)


def test_low_rank_delta_is_batched_with_per_element_scales():
    lora = random_lora(40, 30, 4, seed=12, batch=(3,))
    lora.scale = torch.tensor([1.0, -0.5, 0.0], dtype=F64)
    rb = right_basis(lora, 8, 0.95)
    assert rb.ranks.tolist()[2] == 0
    for i in range(3):
        single = LowRankDelta(lora.lora_B[i], lora.lora_A[i], float(lora.scale[i]))
        ref = right_basis(single.to_dense(), 8, 0.95, method="gram")
        r = int(ref.ranks)
        assert int(rb.ranks[i]) == r
        torch.testing.assert_close(rb.singular_values[i, :r], ref.singular_values, rtol=1e-10, atol=0)
        torch.testing.assert_close(frobenius_norm(lora)[i], frobenius_norm(single.to_dense()), rtol=1e-12, atol=0)


def test_low_rank_delta_is_never_densified(monkeypatch):
    lora = random_lora(50, 40, 3, seed=13)

    def boom(self):  # pragma: no cover - only called on a regression
        raise AssertionError("to_dense called")

    monkeypatch.setattr(LowRankDelta, "to_dense", boom)
    right_basis(lora, 8, 0.9)
    frobenius_norm(lora)
    apply_right(lora, torch.eye(40, dtype=F64))


def test_union_basis_drops_dependent_columns_and_spans_the_union():
    g = gen(14)
    v1 = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=F64)).Q
    v2 = torch.cat([v1[:, :2], torch.linalg.qr(torch.randn(30, 3, generator=g, dtype=F64)).Q], 1)
    delta1 = torch.randn(20, 4, generator=g, dtype=F64) @ v1.T
    delta2 = torch.randn(20, 5, generator=g, dtype=F64) @ v2.T
    b1 = right_basis(delta1, 8, 1.0)
    b2 = right_basis(delta2, 8, 1.0)
    assert (int(b1.ranks), int(b2.ranks)) == (4, 5)
    q, k = union_basis([b1, b2])
    assert int(k) == 7  # 4 + 5 − 2 shared directions
    torch.testing.assert_close(q.T @ q, torch.eye(7, dtype=F64), atol=1e-12, rtol=0)
    both = torch.cat([v1, v2], 1)
    residual = both - q @ (q.T @ both)
    assert float(residual.abs().max()) < 1e-10
    # identical bases: no growth
    q_same, k_same = union_basis([b1, b1])
    assert int(k_same) == 4


def test_union_basis_and_projected_covariance_are_exact_under_padding():
    deltas = torch.stack(
        [
            low_rank_plus_noise(60, 50, signal_rank=2, noise=0.0, seed=15),
            low_rank_plus_noise(60, 50, signal_rank=7, noise=0.0, seed=16),
            torch.zeros(60, 50, dtype=F64),
        ]
    )
    others = torch.stack(
        [
            low_rank_plus_noise(60, 50, signal_rank=5, noise=0.0, seed=17),
            low_rank_plus_noise(60, 50, signal_rank=1, noise=0.0, seed=18),
            low_rank_plus_noise(60, 50, signal_rank=3, noise=0.0, seed=19),
        ]
    )
    ba, bb = right_basis(deltas, 10, 1.0), right_basis(others, 10, 1.0)
    q, k = union_basis([ba, bb])
    assert k.tolist() == [7, 8, 3]
    eps = 1e-6
    cov = projected_covariance(q, k, ba, eps)
    for i in range(3):
        sa = right_basis(deltas[i], 10, 1.0)
        sb = right_basis(others[i], 10, 1.0)
        qi, ki = union_basis([sa, sb])
        ki = int(ki)
        assert ki == int(k[i]) and qi.shape[-1] == ki
        torch.testing.assert_close(q[i, :, :ki], qi, atol=1e-12, rtol=0)
        assert bool((q[i, :, ki:] == 0).all())
        ci = projected_covariance(qi, torch.tensor(ki), sa, eps)
        torch.testing.assert_close(cov[i, :ki, :ki], ci, atol=1e-15, rtol=1e-12)
        assert bool((cov[i, ki:, :] == 0).all()) and bool((cov[i, :, ki:] == 0).all())
        # trace = energy kept + k ε
        torch.testing.assert_close(torch.trace(cov[i]), (sa.singular_values**2).sum() + ki * eps, rtol=1e-12, atol=0)
