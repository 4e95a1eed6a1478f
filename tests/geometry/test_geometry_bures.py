"""PSD roots, Bures–Wasserstein distance (METHOD §1) and the W2 barycenter (METHOD §2.2)."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from cpt.geometry import (
    bures_wasserstein_sq,
    covariance_conflict,
    psd_inv_sqrt,
    psd_sqrt,
    wasserstein_barycenter,
)

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_spd(k, seed, batch=(), ridge=1e-2):
    g = gen(seed)
    x = torch.randn(*batch, k, k, generator=g, dtype=F64)
    return x @ x.mT / k + ridge * torch.eye(k, dtype=F64)


def pad(a, size):
    """Zero-pad the trailing two dims of ``a`` to ``size × size``."""
    out = torch.zeros(*a.shape[:-2], size, size, dtype=a.dtype)
    out[..., : a.shape[-2], : a.shape[-1]] = a
    return out


def test_psd_sqrt_and_inverse_sqrt():
    a = random_spd(6, 0)
    r = psd_sqrt(a)
    torch.testing.assert_close(r @ r, a, atol=1e-12, rtol=0)
    torch.testing.assert_close(r, r.T, atol=0, rtol=0)
    inv = psd_inv_sqrt(a, 1e-12)
    torch.testing.assert_close(inv @ a @ inv, torch.eye(6, dtype=F64), atol=1e-10, rtol=0)
    # negative eigenvalues are clipped to 0 in roots, floored in inverse roots
    d = torch.diag(torch.tensor([4.0, 1.0, -1e-3], dtype=F64))
    torch.testing.assert_close(psd_sqrt(d), torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=F64)))
    torch.testing.assert_close(psd_sqrt(d, eig_floor=0.25), torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=F64)))
    torch.testing.assert_close(psd_inv_sqrt(d, 0.01), torch.diag(torch.tensor([0.5, 1.0, 10.0], dtype=F64)))
    with pytest.raises(ValueError):
        psd_inv_sqrt(d, 0.0)
    # float32 in, float64 out
    assert psd_sqrt(a.float()).dtype == F64


def test_bures_commuting_closed_form():
    a = torch.tensor([4.0, 1.0, 0.25, 0.0], dtype=F64)
    b = torch.tensor([1.0, 9.0, 0.25, 2.0], dtype=F64)
    expected = ((a.sqrt() - b.sqrt()) ** 2).sum()
    got = bures_wasserstein_sq(torch.diag(a), torch.diag(b))
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
    # rotating both by the same orthogonal matrix changes nothing (away from a zero
    # eigenvalue: the square root amplifies a rounding-level eigenvalue 1e-16 to 1e-8)
    a[3] = 0.01
    expected = ((a.sqrt() - b.sqrt()) ** 2).sum()
    u = torch.linalg.qr(torch.randn(4, 4, generator=gen(1), dtype=F64)).Q
    got_rot = bures_wasserstein_sq(u @ torch.diag(a) @ u.T, u @ torch.diag(b) @ u.T)
    torch.testing.assert_close(got_rot, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        bures_wasserstein_sq(torch.diag(a), torch.diag(a)), torch.tensor(0.0, dtype=F64), atol=1e-14, rtol=0
    )


def test_bures_matches_pot_on_random_spd_batches():
    a = random_spd(7, 2, batch=(5,), ridge=1e-3)
    b = random_spd(7, 3, batch=(5,), ridge=1e-3)
    ours = bures_wasserstein_sq(a, b)
    pot = ot.gaussian.bures_distance(a.numpy(), b.numpy(), paired=True) ** 2
    np.testing.assert_allclose(ours.numpy(), pot, rtol=1e-9, atol=1e-13)
    # symmetric, and the batch equals element-wise calls
    torch.testing.assert_close(bures_wasserstein_sq(b, a), ours, rtol=1e-9, atol=1e-13)
    for i in range(5):
        torch.testing.assert_close(bures_wasserstein_sq(a[i], b[i]), ours[i], rtol=1e-12, atol=1e-15)


def test_eig_floor_lowers_the_distance():
    # tiny covariances: the ε floor dominates the cross term
    a = random_spd(5, 4, ridge=0) * 1e-4
    b = random_spd(5, 5, ridge=0) * 1e-4
    exact = bures_wasserstein_sq(a, b)
    floored = bures_wasserstein_sq(a, b, eig_floor=1e-6)
    assert float(floored) < float(exact)
    assert float(covariance_conflict(a, b, eig_floor=1e-6)) < float(covariance_conflict(a, b))


@pytest.mark.parametrize("eig_floor", [0.0, 1e-3])
def test_padded_dims_are_exact(eig_floor):
    a = random_spd(4, 6, batch=(2,))
    b = random_spd(4, 7, batch=(2,))
    a[1, 3, :] = a[1, :, 3] = 0  # second element: only 3 valid dims
    b[1, 3, :] = b[1, :, 3] = 0
    dims = torch.tensor([4, 3])
    padded_a, padded_b = pad(a, 6), pad(b, 6)
    got = bures_wasserstein_sq(padded_a, padded_b, eig_floor=eig_floor, dims=dims)
    for i, k in enumerate([4, 3]):
        ref = bures_wasserstein_sq(a[i, :k, :k], b[i, :k, :k], eig_floor=eig_floor)
        torch.testing.assert_close(got[i], ref, rtol=1e-12, atol=1e-15)
        root = psd_sqrt(padded_a[i], eig_floor=eig_floor, dims=dims[i])
        torch.testing.assert_close(root[:k, :k], psd_sqrt(a[i, :k, :k], eig_floor=eig_floor), atol=1e-13, rtol=0)
        assert bool((root[k:] == 0).all()) and bool((root[:, k:] == 0).all())
        inv = psd_inv_sqrt(padded_a[i], 1e-6, dims=dims[i])
        torch.testing.assert_close(inv[:k, :k], psd_inv_sqrt(a[i, :k, :k], 1e-6), atol=1e-11, rtol=0)
    if eig_floor > 0:
        # without `dims` the floor would act on the padded zeros: a different answer
        wrong = bures_wasserstein_sq(padded_a[1], padded_b[1], eig_floor=eig_floor)
        assert not torch.isclose(wrong, got[1], rtol=1e-6)


def test_barycenter_commuting_closed_form():
    diag = torch.tensor([[4.0, 1.0, 0.01], [1.0, 9.0, 0.04], [0.25, 4.0, 1.0]], dtype=F64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    covs = torch.diag_embed(diag)
    bary, iters = wasserstein_barycenter(covs, weights, iters=100, tol=1e-14)
    expected_root = (weights[:, None] * diag.sqrt()).sum(0)
    torch.testing.assert_close(bary, torch.diag(expected_root**2), rtol=1e-10, atol=1e-14)
    assert 1 <= int(iters) < 100


def test_barycenter_of_two_is_the_mccann_interpolant():
    a = random_spd(5, 8)
    b = random_spd(5, 9)
    t = 0.3
    a_half, a_inv_half = psd_sqrt(a), psd_inv_sqrt(a, 1e-300)
    transport = a_inv_half @ psd_sqrt(a_half @ b @ a_half) @ a_inv_half
    mix = (1 - t) * torch.eye(5, dtype=F64) + t * transport
    expected = mix @ a @ mix
    bary, _ = wasserstein_barycenter(
        torch.stack([a, b]), torch.tensor([1 - t, t], dtype=F64), iters=200, tol=1e-13, eps=1e-300
    )
    torch.testing.assert_close(bary, expected, rtol=1e-9, atol=1e-12)


def test_barycenter_matches_pot_and_normalises_weights():
    covs = random_spd(6, 10, batch=(4,), ridge=1e-3)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    ours, _ = wasserstein_barycenter(covs, weights, iters=500, tol=1e-13)
    w_norm = (weights / weights.sum()).numpy()
    pot = ot.gaussian.bures_barycenter_fixpoint(covs.numpy(), weights=w_norm, num_iter=2000, eps=1e-14)
    np.testing.assert_allclose(ours.numpy(), pot, rtol=1e-8, atol=1e-11)
    _, pot2 = ot.gaussian.bures_wasserstein_barycenter(
        np.zeros((4, 6)), covs.numpy(), weights=w_norm, num_iter=2000, eps=1e-14
    )
    np.testing.assert_allclose(ours.numpy(), pot2, rtol=1e-8, atol=1e-11)
    # only relative weights matter
    scaled, _ = wasserstein_barycenter(covs, 10 * weights, iters=500, tol=1e-13)
    torch.testing.assert_close(scaled, ours, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError):
        wasserstein_barycenter(covs, torch.zeros(4, dtype=F64))


def test_barycenter_defaults_reach_tolerance_and_batched_equals_unbatched():
    easy = torch.diag_embed(torch.tensor([[1.0, 2.0, 3.0], [2.0, 1.0, 3.0]], dtype=F64))
    hard = random_spd(3, 11, batch=(2,), ridge=1e-4) * torch.tensor([1.0, 50.0], dtype=F64)[:, None, None]
    covs = torch.stack([easy, hard])  # [2, n=2, 3, 3]
    weights = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=F64)
    bary, iters = wasserstein_barycenter(covs, weights)
    assert iters.shape == (2,) and iters[0] != iters[1]
    for i in range(2):
        single, it = wasserstein_barycenter(covs[i], weights[i])
        assert int(it) == int(iters[i])
        torch.testing.assert_close(bary[i], single, rtol=1e-12, atol=1e-15)
    # the fixed point is reached: one more step moves it by less than the tolerance
    ref, _ = wasserstein_barycenter(covs, weights, iters=500, tol=1e-14)
    rel = torch.linalg.matrix_norm(bary - ref) / torch.linalg.matrix_norm(ref)
    assert float(rel.max()) < 1e-4


@pytest.mark.parametrize("eig_floor", [0.0, 1e-4])
def test_barycenter_with_padded_dims_equals_the_unpadded_computation(eig_floor):
    covs = random_spd(5, 12, batch=(2, 3), ridge=1e-3)
    dims = torch.tensor([5, 3])
    covs[1, :, 3:, :] = 0
    covs[1, :, :, 3:] = 0
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    padded = pad(covs, 7)
    bary, iters = wasserstein_barycenter(padded, weights, eps=1e-6, eig_floor=eig_floor, dims=dims)
    for i, k in enumerate([5, 3]):
        ref, it = wasserstein_barycenter(covs[i, :, :k, :k], weights, eps=1e-6, eig_floor=eig_floor)
        assert int(it) == int(iters[i])
        torch.testing.assert_close(bary[i, :k, :k], ref, rtol=1e-11, atol=1e-14)
        assert bool((bary[i, k:] == 0).all()) and bool((bary[i, :, k:] == 0).all())
