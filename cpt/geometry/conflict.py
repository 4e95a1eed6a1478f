"""Geometry conflict, subspace alignment and the state-relative signal (METHOD.md §1)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .bases import (
    Delta,
    RightBasis,
    apply_right,
    frobenius_norm,
    gram_path_threads,
    projected_covariance,
    right_basis,
    union_basis,
)
from .bures import _valid_trace, bures_wasserstein_sq

__all__ = [
    "conflict_from_bases",
    "covariance_conflict",
    "geometry_conflict",
    "subspace_alignment_ratio",
    "state_relative_geometry",
]


def covariance_conflict(b_i: Tensor, b_j: Tensor, eig_floor: float = 0.0, dims: Tensor | None = None) -> Tensor:
    """Geometry conflict of two covariances, ``GC = d²(B_i, B_j) / (tr B_i + tr B_j)``
    (METHOD §1), in ``[0, 1]``; NaN where both traces are 0.

    ``d²`` is :func:`bures_wasserstein_sq` (same ``eig_floor`` and ``dims`` semantics).
    Returns ``[...]`` float64.
    """
    b_i = b_i.to(torch.float64)
    b_j = b_j.to(torch.float64)
    d2 = bures_wasserstein_sq(b_i, b_j, eig_floor=eig_floor, dims=dims)
    denom = _valid_trace(b_i, dims) + _valid_trace(b_j, dims)
    return torch.where(denom > 0, d2 / denom, torch.full_like(d2, float("nan")))


def conflict_from_bases(
    basis_a: RightBasis, basis_b: RightBasis, eps: float = 1e-6, eig_floor: float = 0.0
) -> tuple[Tensor, Tensor]:
    """``GC`` of two deltas from their precomputed right bases (METHOD §1).

    Union basis, projected covariances and :func:`covariance_conflict`, exactly as in
    :func:`geometry_conflict` (which calls this). Returns ``(GC [...] float64,
    union rank k [...] long)``; GC is NaN where either basis is empty (a zero delta).
    """
    q, k = union_basis([basis_a, basis_b])
    cov_a = projected_covariance(q, k, basis_a, eps)
    cov_b = projected_covariance(q, k, basis_b, eps)
    gc = covariance_conflict(cov_a, cov_b, eig_floor=eig_floor, dims=k)
    undefined = (basis_a.ranks == 0) | (basis_b.ranks == 0)
    gc = torch.where(undefined, torch.full_like(gc, float("nan")), gc)
    return gc, k


# Former private name, kept for callers that imported it.
_pair_conflict = conflict_from_bases


def geometry_conflict(
    delta_a: Delta,
    delta_b: Delta,
    rank: int = 32,
    energy: float = 0.95,
    eps: float = 1e-6,
    eig_floor: float = 0.0,
    *,
    method: str = "auto",
) -> Tensor:
    """Geometry conflict ``GC(Δ_a, Δ_b)`` of two deltas (METHOD §1).

    Right bases (:func:`right_basis`, ``rank``/``energy``), their union basis ``Q``, the
    projected covariances ``B = (QᵀV) S² (QᵀV)ᵀ + ε I`` and
    ``GC = d²(B_a, B_b) / (tr B_a + tr B_b)``. 0 for identical geometry, → 1 for
    orthogonal row spaces; symmetric; invariant to rescaling both deltas by the same
    factor (up to the fixed ridge ε). Deltas are dense ``[..., d_out, d_in]`` or
    :class:`LowRankDelta` (mixed is fine). NaN where either delta is exactly zero (the
    conflict is undefined). Returns ``[...]`` float64.
    """
    basis_a = right_basis(delta_a, rank, energy, method=method)
    basis_b = right_basis(delta_b, rank, energy, method=method)
    return conflict_from_bases(basis_a, basis_b, eps, eig_floor)[0]


def _sar(delta_i: Delta, basis_j: Tensor, norm_i: Tensor) -> Tensor:
    proj = torch.linalg.vector_norm(apply_right(delta_i, basis_j), dim=(-2, -1), dtype=torch.float64)
    return torch.where(
        norm_i > 0,
        proj / norm_i.clamp_min(torch.finfo(torch.float64).tiny),
        torch.full_like(proj, float("nan")),
    )


def subspace_alignment_ratio(delta_i: Delta, basis_j: RightBasis | Tensor) -> Tensor:
    """``SAR(i→j) = ‖Δ_i V_j‖_F / ‖Δ_i‖_F`` (METHOD §1), in ``[0, 1]``.

    ``basis_j`` is a :class:`RightBasis` (of Δ_j) or an orthonormal ``[..., d_in, r]``
    tensor (zero padding columns allowed). NaN where ``Δ_i`` is zero; 0 where the basis is
    empty (``Δ_j = 0``). Returns ``[...]`` float64.
    """
    v = basis_j.basis if isinstance(basis_j, RightBasis) else basis_j
    return _sar(delta_i, v, frobenius_norm(delta_i))


def state_relative_geometry(
    state_delta: Delta,
    update: Delta,
    rank: int = 32,
    energy: float = 0.95,
    eps: float = 1e-6,
    eig_floor: float = 0.0,
    *,
    method: str = "auto",
) -> dict[str, Tensor]:
    """The per-tensor state-relative signal at one step (METHOD §1).

    ``state_delta = θ_{t−1} − θ0`` and ``update = Δ_t`` (same shape, dense or LoRA).
    Each right basis is computed once. Returns ``[...]`` tensors:

    - ``geometry_conflict``: ``GC(state, update)`` (NaN if either is zero, e.g. t = 1);
    - ``sar_state_to_update``: ``‖Δ_state V_update‖/‖Δ_state‖`` (NaN for a zero state);
    - ``sar_update_to_state``: ``‖Δ_t V_state‖/‖Δ_t‖`` (0 for a zero state, NaN for a
      zero update);
    - ``norm_update``, ``norm_state``: Frobenius norms (float64);
    - ``rank_state``, ``rank_update``: kept ranks ``r`` (long);
    - ``union_rank``: columns ``k`` of the union basis (long).

    On the CPU, when both deltas take the Gram path, torch runs on one thread meanwhile
    (:func:`cpt.geometry.bases.gram_path_threads`; the eigensolves run concurrently).
    """
    if method == "randomized":
        threads = contextlib.nullcontext()
    else:
        threads = gram_path_threads([state_delta, update], rank, state_delta.device)
    with threads:
        return _state_relative_geometry(state_delta, update, rank, energy, eps, eig_floor, method)


def _state_relative_geometry(
    state_delta: Delta, update: Delta, rank: int, energy: float, eps: float, eig_floor: float, method: str
) -> dict[str, Tensor]:
    basis_s = right_basis(state_delta, rank, energy, method=method)
    basis_u = right_basis(update, rank, energy, method=method)
    gc, k = conflict_from_bases(basis_s, basis_u, eps, eig_floor)
    norm_s = basis_s.squared_norm.sqrt()
    norm_u = basis_u.squared_norm.sqrt()
    return {
        "geometry_conflict": gc,
        "sar_state_to_update": _sar(state_delta, basis_u.basis, norm_s),
        "sar_update_to_state": _sar(update, basis_s.basis, norm_u),
        "norm_update": norm_u,
        "norm_state": norm_s,
        "rank_state": basis_s.ranks,
        "rank_update": basis_u.ranks,
        "union_rank": k,
    }
