"""PSD matrix roots, the Bures–Wasserstein distance (METHOD.md §1) and the Gaussian W2
barycenter fixed point (METHOD.md §2.2).

Everything is float64 (inputs are cast), batched over leading dimensions, and follows
the input's device. Matrices may carry *padded* dimensions: pass ``dims`` (``[...]``
long, the number of valid leading dimensions, e.g. ``k`` from
:func:`cpt.geometry.union_basis`) and the padded rows/columns are treated as absent —
results equal the computation on the unpadded ``k × k`` blocks and are exactly zero on
the padding. Internally the padded diagonal is filled with a marker of the valid block's
scale (so floors and inverse roots never see a zero there, and the eigensolver sees the
same scale as the unpadded problem) and zeroed afterwards; a matrix function of a
block-diagonal matrix is block diagonal, so the marker never leaks into the valid block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bases import small_linalg

__all__ = [
    "psd_sqrt",
    "psd_inv_sqrt",
    "bures_wasserstein_sq",
    "wasserstein_barycenter",
    "valid_mask",
]


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.mT)


def valid_mask(dims: Tensor, size: int) -> Tensor:
    """``[..., size]`` bool, True on the first ``dims`` valid coordinates of each element
    (the ``k`` valid union-basis dimensions of METHOD §1 projected covariances)."""
    return torch.arange(size, device=dims.device) < dims.unsqueeze(-1)


def _valid_outer(dims: Tensor, size: int) -> Tensor:
    m = valid_mask(dims, size).to(torch.float64)
    return m.unsqueeze(-1) * m.unsqueeze(-2)


def _valid_trace(a: Tensor, dims: Tensor | None) -> Tensor:
    diag = a.diagonal(dim1=-2, dim2=-1)
    if dims is not None:
        diag = diag * valid_mask(dims, a.shape[-1]).to(diag.dtype)
    return diag.sum(-1)


def _with_marker(a: Tensor, dims: Tensor, marker: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Zero ``a``'s padded rows/cols and put ``marker`` on the padded diagonal.

    The default marker is the valid block's mean diagonal (1 where that is not positive).
    Returns ``(marked matrix, marker [...])``.
    """
    size = a.shape[-1]
    mask = valid_mask(dims, size)
    a = a * _valid_outer(dims, size)
    if marker is None:
        marker = _valid_trace(a, dims) / dims.clamp_min(1).to(a.dtype)
        marker = torch.where(marker > 0, marker, torch.ones_like(marker))
    pad = (~mask).to(a.dtype) * marker.unsqueeze(-1)
    return a + torch.diag_embed(pad), marker


def _eig_fn(a: Tensor, fn, dims: Tensor | None) -> Tensor:
    """``W fn(λ) Wᵀ`` for symmetric ``a`` (float64), padding handled as described above."""
    a = _sym(a.to(torch.float64))
    if dims is not None:
        a, _ = _with_marker(a, dims)
    with small_linalg(a.device):  # k × k covariances (METHOD §1): one thread on the CPU
        evals, evecs = torch.linalg.eigh(a)
    out = (evecs * fn(evals).unsqueeze(-2)) @ evecs.mT
    out = _sym(out)
    if dims is not None:
        out = out * _valid_outer(dims, a.shape[-1])
    return out


def psd_sqrt(a: Tensor, eig_floor: float = 0.0, dims: Tensor | None = None) -> Tensor:
    """Square root ``A^{1/2}`` of a symmetric PSD matrix (METHOD §1, Bures roots).

    Symmetric eigendecomposition in float64; eigenvalues are clipped below at
    ``max(eig_floor, 0)`` — by default negatives (rounding) are clipped to 0 and nothing
    else is changed. ``eig_floor > 0`` reproduces the reference merge code's ε floor.
    Returns ``[..., k, k]`` float64.
    """
    lo = max(float(eig_floor), 0.0)
    return _eig_fn(a, lambda lam: lam.clamp_min(lo).sqrt(), dims)


def psd_inv_sqrt(a: Tensor, floor: float, dims: Tensor | None = None) -> Tensor:
    """Inverse square root ``A^{-1/2}`` with eigenvalues floored at ``floor``
    (METHOD §2.2: inverse roots floor eigenvalues at ε; also §2.5 whitening).

    Symmetric eigendecomposition in float64. ``floor`` must be positive. Padded
    dimensions (``dims``) are exactly zero in the result.
    """
    if not floor > 0:
        raise ValueError(f"psd_inv_sqrt needs a positive floor, got {floor}")
    return _eig_fn(a, lambda lam: lam.clamp_min(floor).rsqrt(), dims)


def bures_wasserstein_sq(a: Tensor, b: Tensor, eig_floor: float = 0.0, dims: Tensor | None = None) -> Tensor:
    """Squared Bures–Wasserstein distance between PSD matrices (METHOD §1).

    ``d²(A, B) = tr A + tr B − 2 tr (A^{1/2} B A^{1/2})^{1/2}``, clamped at 0. Both roots
    by float64 symmetric eigendecomposition with eigenvalues clipped at
    ``max(eig_floor, 0)`` (default: negatives to 0, no ε floor — see METHOD §1; a
    positive ``eig_floor`` raises the cross term and so lowers ``d²``). Traces are of
    ``A`` and ``B`` themselves. Returns ``[...]`` float64; equals
    ``ot.gaussian.bures_distance(A, B) ** 2``.
    """
    a = _sym(a.to(torch.float64))
    b = _sym(b.to(torch.float64))
    lo = max(float(eig_floor), 0.0)
    a_half = psd_sqrt(a, eig_floor, dims)
    cross_mat = _sym(a_half @ b @ a_half)
    if dims is None:
        with small_linalg(cross_mat.device):
            cross = torch.linalg.eigvalsh(cross_mat).clamp_min(lo).sqrt().sum(-1)
    else:
        cross = _valid_trace(psd_sqrt(cross_mat, eig_floor, dims), dims)
    d2 = _valid_trace(a, dims) + _valid_trace(b, dims) - 2.0 * cross
    return d2.clamp_min(0.0)


def wasserstein_barycenter(
    covariances: Tensor,
    weights: Tensor,
    iters: int = 50,
    tol: float = 1e-5,
    eps: float = 1e-6,
    eig_floor: float = 0.0,
    dims: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gaussian W2 (Bures–Wasserstein) barycenter by the fixed point of METHOD §2.2.

    ``B ← B^{-1/2} (Σ_i w_i (B^{1/2} B_i B^{1/2})^{1/2})² B^{-1/2}``, started at
    ``Σ_i w_i B_i``, until ``‖B_new − B‖_F / ‖B‖_F < tol`` or ``iters`` updates. Roots
    clip eigenvalues at ``max(eig_floor, 0)``; inverse roots floor them at ``eps``.

    Weights are **normalised to sum to 1** per batch element (``w / Σw``): the
    barycenter is a weighted mean, so only relative weights matter and
    ``weights=(1, 1)`` equals ``(0.5, 0.5)``. This is the barycenter POT computes
    (``ot.gaussian.bures_wasserstein_barycenter`` / ``bures_barycenter_fixpoint``,
    whose default weights are uniform 1/n) — note POT uses explicit weights as given,
    and for weights summing to W its fixed point lands on ``W² · B*``, so compare with
    POT using normalised weights.

    Each batch element stops on its own: once its relative change drops below ``tol`` it
    keeps that iterate (the ``B_new`` that passed the test) and is not changed further,
    so batched equals unbatched.

    Args:
        covariances: ``[..., n, k, k]`` PSD matrices (cast to float64).
        weights: ``[n]`` or ``[..., n]`` non-negative, positive sum.
        dims: optional ``[...]`` valid dimension counts for padded inputs (see module
            docstring); padded rows/columns of the result are exactly zero.

    Returns:
        ``(barycenter [..., k, k] float64, iterations_used [...] long)``.
    """
    c = _sym(covariances.to(torch.float64))
    if c.dim() < 3:
        raise ValueError(f"covariances must be [..., n, k, k], got {tuple(c.shape)}")
    n, size = c.shape[-3], c.shape[-1]
    batch_shape = c.shape[:-3]
    w = torch.as_tensor(weights, dtype=torch.float64, device=c.device)
    if w.shape[-1] != n:
        raise ValueError(f"weights has {w.shape[-1]} entries for {n} covariances")
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    w_sum = w.sum(-1, keepdim=True)
    if bool((w_sum <= 0).any()):
        raise ValueError("weights must have a positive sum")
    w = (w / w_sum).expand(*batch_shape, n)
    lo = max(float(eig_floor), 0.0)

    c = c.reshape(-1, n, size, size)
    w = w.reshape(-1, n)
    bsz = c.shape[0]
    bary = (w[..., None, None] * c).sum(-3)
    outer = None
    if dims is not None:
        dims = dims.to(c.device).expand(batch_shape).reshape(-1)
        bary, marker = _with_marker(bary, dims)
        c = _with_marker(c, dims.unsqueeze(-1).expand(bsz, n), marker.unsqueeze(-1).expand(bsz, n))[0]
        outer = _valid_outer(dims, size)

    used = torch.zeros(bsz, dtype=torch.long, device=c.device)
    active = torch.ones(bsz, dtype=torch.bool, device=c.device)
    for _ in range(iters):
        evals, evecs = torch.linalg.eigh(_sym(bary))
        root = (evecs * evals.clamp_min(lo).sqrt().unsqueeze(-2)) @ evecs.mT
        inv_root = (evecs * evals.clamp_min(eps).rsqrt().unsqueeze(-2)) @ evecs.mT
        inner = _sym(root.unsqueeze(-3) @ c @ root.unsqueeze(-3))
        ie, iv = torch.linalg.eigh(inner)
        inner_roots = (iv * ie.clamp_min(lo).sqrt().unsqueeze(-2)) @ iv.mT
        mean_root = (w[..., None, None] * inner_roots).sum(-3)
        new = _sym(inv_root @ mean_root @ mean_root @ inv_root)
        diff = new - bary
        ref = bary
        if outer is not None:
            diff = diff * outer
            ref = ref * outer
        diff_norm = torch.linalg.matrix_norm(diff)
        ref_norm = torch.linalg.matrix_norm(ref)
        rel = torch.where(
            ref_norm > 0,
            diff_norm / ref_norm.clamp_min(torch.finfo(torch.float64).tiny),
            torch.where(diff_norm > 0, torch.full_like(diff_norm, float("inf")), diff_norm),
        )
        bary = torch.where(active[:, None, None], new, bary)
        used = used + active.long()
        active = active & ~(rel < tol)
        if not bool(active.any()):
            break
    if outer is not None:
        bary = bary * outer
    return bary.reshape(*batch_shape, size, size), used.reshape(batch_shape)
