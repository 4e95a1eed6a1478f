"""The GCWM merge of one active set (METHOD §2, steps 1–7), data-free.

Tensor-in, tensor-out: no files, no HF objects, no globals. Every function works on one
*target* tensor batched over leading dimensions: all deltas of one call are
``[..., d_out, d_in]`` with the same shape (typically the same projection of every
transformer block stacked), and every batch element is merged exactly as it would be on
its own. Results follow the inputs' device (CPU or CUDA).

Precision: right bases, union basis, covariances, barycenter, conflict and the metric
roots are float64 (``cpt.geometry``). The large products (whitening, the objective's
Gram matrices) run in the deltas' working precision (float64 for float64 deltas, float32
otherwise, :func:`cpt.geometry.compute_dtype_for`), and the Adam loop in float32 by
default (``adam_dtype``, see :func:`cpt.merging.inner_solver.adam_displacement`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ...geometry import (
    compute_dtype_for,
    covariance_conflict,
    projected_covariance,
    psd_inv_sqrt,
    psd_sqrt,
    right_basis,
    union_basis,
    valid_mask,
    wasserstein_barycenter,
)
from ..inner_solver import adam_displacement, check_deltas, check_weights
from ..merge_diagnostics import plain_sum as weighted_plain_sum
from ..merge_diagnostics import relative_change, relative_norm
from .params import GCWMParams

__all__ = [
    "BRANCH_BOTH",
    "BRANCH_PLAIN",
    "BRANCH_RELATION",
    "GCWMGeometry",
    "gcwm_geometry",
    "gcwm_merge",
]

#: ``stats["branch"]`` codes (METHOD §2.7).
BRANCH_PLAIN, BRANCH_RELATION, BRANCH_BOTH = 0, 1, 2


def _gate(conflict: Tensor, params: GCWMParams) -> Tensor:
    """METHOD §2.4: ``α = α_min + (α_max − α_min) σ(s (c − c0))``; ``gate="none"`` ⇒ α = 1."""
    if params.gate == "none":
        return torch.ones_like(conflict)
    return params.alpha_min + (params.alpha_max - params.alpha_min) * torch.sigmoid(
        params.gate_sharpness * (conflict - params.gate_threshold)
    )


def _branch(alpha: Tensor, params: GCWMParams) -> Tensor:
    """METHOD §2.7: plain only when ``α ≤ skip_tol`` (0.05), relation only when
    ``α ≥ 1 − skip_tol`` (0.95), both otherwise."""
    both = torch.full_like(alpha, BRANCH_BOTH, dtype=torch.long)
    choice = torch.where(alpha >= 1.0 - params.skip_tol, torch.full_like(both, BRANCH_RELATION), both)
    return torch.where(alpha <= params.skip_tol, torch.full_like(both, BRANCH_PLAIN), choice)


def _layer_conflict(covariances: Tensor, weights: Tensor, union_rank: Tensor, eig_floor: float) -> Tensor:
    """METHOD §2.3: ``c = Σ_{i<j} w_i w_j GC(B_i, B_j) / Σ_{i<j} w_i w_j``.

    ``covariances [B, n, K, K]``, ``weights [B, n]`` (0 for dropped deltas). With fewer than
    two active deltas there is no pair and ``c = 0`` (a single geometry does not conflict
    with itself: ``GC(B, B) = 0``).
    """
    batch_size, count = weights.shape
    if count < 2:
        return torch.zeros(batch_size, dtype=torch.float64, device=covariances.device)
    first, second = torch.triu_indices(count, count, offset=1, device=covariances.device)
    pair_weights = weights[:, first] * weights[:, second]  # [B, P]
    pair_count = first.numel()
    if covariances.shape[-1] == 0:
        return torch.zeros(batch_size, dtype=torch.float64, device=covariances.device)
    pair_conflict = covariance_conflict(
        covariances[:, first],
        covariances[:, second],
        eig_floor=eig_floor,
        dims=union_rank.unsqueeze(-1).expand(batch_size, pair_count),
    )
    pair_conflict = torch.where(pair_weights > 0, pair_conflict, torch.zeros_like(pair_conflict))
    numerator = (pair_weights * pair_conflict).sum(-1)
    denominator = pair_weights.sum(-1)
    return torch.where(
        denominator > 0, numerator / denominator.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(numerator)
    )


@dataclass
class GCWMGeometry:
    """Steps 1–4 of METHOD §2 (and the §2.7 branch choice) for a flattened batch ``[B]``.

    - ``basis``: union basis ``Q`` ``[B, d_in, K]`` float64 (zero padding past ``k``);
    - ``union_rank``: ``k`` ``[B]`` long;
    - ``covariances``: ``B_i`` ``[B, n, K, K]`` float64 (ridge ε on the valid block);
    - ``metric``: ``B*`` ``[B, K, K]`` float64; ``bary_iters`` ``[B]`` long;
    - ``weights``: effective ``w_i`` ``[B, n]`` float64 (0 for dropped zero deltas);
    - ``squared_norms``: ``‖v_i‖_F²`` ``[B, n]`` float64;
    - ``conflict``, ``alpha`` ``[B]`` float64; ``branch`` ``[B]`` long.
    """

    basis: Tensor
    union_rank: Tensor
    covariances: Tensor
    metric: Tensor
    bary_iters: Tensor
    weights: Tensor
    squared_norms: Tensor
    conflict: Tensor
    alpha: Tensor
    branch: Tensor


def _geometry(
    deltas: list[Tensor], weights: list[float], params: GCWMParams, exact_shortcuts: bool = True
) -> GCWMGeometry:
    """METHOD §2 steps 1–4 on flattened deltas ``v_i [B, d_out, d_in]``.

    ``exact_shortcuts``: for an element with one active delta ``B*`` is that ``B_i`` itself
    (the barycenter of one covariance, exactly the weighted mean) with ``bary_iters`` 0, and
    the fixed point is not run at all when no element has two active deltas."""
    f64 = torch.float64
    batch_size, count = deltas[0].shape[0], len(deltas)
    device = deltas[0].device

    # 1. Right bases, union basis, projected covariances (METHOD §1 / §2.1).
    bases = [right_basis(delta, params.rank, params.energy) for delta in deltas]
    squared_norms = torch.stack([basis.squared_norm for basis in bases], -1).to(f64)  # [B, n]
    given_weights = torch.tensor(weights, dtype=f64, device=device).expand(batch_size, count)
    active_weights = torch.where(squared_norms > 0, given_weights, torch.zeros_like(given_weights))  # dropped: 0
    union, union_rank = union_basis(bases)  # [B, d_in, K], [B]
    max_rank = union.shape[-1]
    covariances = torch.stack([projected_covariance(union, union_rank, basis, params.eps) for basis in bases], -3)

    # 2. Shared metric B* (METHOD §2.2), weights normalised (ŵ = w/Σw) in both modes.
    has_active = active_weights.sum(-1) > 0
    metric_weights = torch.where(has_active.unsqueeze(-1), active_weights, torch.ones_like(active_weights))
    # One active delta: B* is that B_i itself (exactly the weighted mean), no fixed point needed.
    single = (active_weights > 0).sum(-1) <= 1 if exact_shortcuts else torch.zeros_like(has_active)
    bary_used = torch.zeros(batch_size, dtype=torch.long, device=device)
    if max_rank == 0:
        shared_metric = torch.zeros(batch_size, 0, 0, dtype=f64, device=device)
    else:
        normalised = metric_weights / metric_weights.sum(-1, keepdim=True)
        shared_metric = (normalised[..., None, None] * covariances).sum(-3)
        if params.metric == "barycenter" and not bool(single.all()):
            barycenter, bary_iters = wasserstein_barycenter(
                covariances,
                metric_weights,
                iters=params.bary_iters,
                tol=params.bary_tol,
                eps=params.eps,
                eig_floor=params.eig_floor,
                dims=union_rank,
            )
            shared_metric = torch.where(single[:, None, None], shared_metric, barycenter)
            bary_used = torch.where(single, bary_used, bary_iters.to(torch.long))

    # 3. Layer conflict, 4. gate, 7. branch choice.
    conflict = _layer_conflict(covariances, active_weights, union_rank, params.eig_floor)
    alpha = _gate(conflict, params)
    return GCWMGeometry(
        basis=union,
        union_rank=union_rank.to(torch.long),
        covariances=covariances,
        metric=shared_metric,
        bary_iters=bary_used.to(torch.long),
        weights=active_weights,
        squared_norms=squared_norms,
        conflict=conflict,
        alpha=alpha,
        branch=_branch(alpha, params),
    )


def gcwm_geometry(deltas: Sequence[Tensor], weights: Sequence[float], params: GCWMParams | None = None) -> GCWMGeometry:
    """METHOD §2 steps 1–4 only (bases, union, ``B_i``, ``B*``, conflict, gate, branch),
    for deltas ``[..., d_out, d_in]``; fields are flattened over the batch (``[B, ...]``,
    ``B = prod(...)``). :func:`gcwm_merge` computes exactly this first. Deltas with weight
    0 are left out (the ``n`` axis indexes the others)."""
    params = params if params is not None else GCWMParams()
    deltas = list(deltas)
    shape, dtype = check_deltas(deltas)
    d_out, d_in = shape[-2:]
    weights = check_weights(weights, len(deltas))
    work_dtype = compute_dtype_for(dtype)
    flat = [delta.reshape(-1, d_out, d_in).to(work_dtype) for delta, weight in zip(deltas, weights) if weight > 0]
    return _geometry(flat, [weight for weight in weights if weight > 0], params)


def gcwm_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    params: GCWMParams | None = None,
    *,
    adam_dtype: torch.dtype = torch.float32,
    loop_tf32: bool = False,
    exact_shortcuts: bool = True,
    diagnostics: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Merge one active set of deltas by GCWM (METHOD §2, steps 1–7).

    Args:
        deltas: n ≥ 1 tensors ``[..., d_out, d_in]`` of the same shape (leading dims are a
            batch of independent target tensors), e.g. ``[m_{t−1}, τ_t]``.
        weights: n non-negative ``w_i`` (shared by all batch elements).
        params: :class:`GCWMParams` (defaults if None).
        adam_dtype: precision of the inner Adam loop (float32 by default).
        loop_tf32: CUDA only, opt-in: TF32 for the loop's per-step product (see
            :func:`cpt.merging.inner_solver.adam_displacement`).
        exact_shortcuts: skip what is known exactly (default; ``False`` computes the long
            way, for tests and benchmarks), see below.
        diagnostics: add what the merge did (METHOD §2.10) to ``stats``, see Returns.

    Per batch element:

    1. right bases ``V_i, S_i`` (``rank``, ``energy``), union basis ``Q`` (k columns),
       projected covariances ``B_i`` (§1, via :mod:`cpt.geometry`);
    2. ``B*``: W2 barycenter of ``{B_i}`` (fixed point, ``bary_iters``, ``bary_tol``) or,
       for ``metric="mean"``, ``Σ ŵ_i B_i`` — in both modes with the weights normalised,
       ``ŵ = w/Σw`` (the barycenter is a weighted mean and its fixed point starts at
       ``Σ ŵ_i B_i``, so ``mean`` is exactly that start);
    3. layer conflict ``c``: the ``w_i w_j``-weighted mean of ``GC(B_i, B_j)`` over pairs
       (B_i on the union basis of the whole set); ``c = 0`` with one active delta;
    4. gate ``α`` (``gate="none"``: α = 1);
    5. metric maps on rows: whiten ``x ↦ (xQ)B*^{-1/2}Qᵀ + ε^{-1/2}(x − xQQᵀ)``,
       recolor ``x ↦ (xQ)B*^{1/2}Qᵀ + ε^{1/2}(x − xQQᵀ)``; ``B*^{1/2}`` clips eigenvalues
       at 0, ``B*^{-1/2}`` floors them at ε (§2.2);
    6. the inner objective minimised by Adam (:func:`cpt.merging.inner_solver.adam_merge`'s solver);
    7. ``m_rel = recolor(Adam over whiten(v_i))``, ``m_plain = Adam over v_i``,
       ``m = α m_rel + (1−α) m_plain``; when ``α ≤ skip_tol`` only the plain branch is
       computed and ``m = m_plain``, when ``α ≥ 1 − skip_tol`` only the relation branch
       and ``m = m_rel`` (METHOD: α ≤ 0.05 / α ≥ 0.95 with ``skip_tol = 0.05``).

    Zero deltas (``‖v_i‖ = 0``, per batch element) are dropped from that element's active
    set: they add no basis columns and nothing to ``m_0``, get weight 0 in the
    barycenter and in the conflict pairs, and their objective term (``0/0``) is left
    out — the result equals the merge without them. An element whose deltas are all zero
    gets ``m = 0``, ``c = 0``. A zero weight removes that delta from the active set of
    every element (at least one weight must be positive).

    Exact shortcuts (issue 19; results equal the long path to float rounding): an element
    with one active delta ``u`` (step 1 of a continual run in either memory mode, a window
    of one) gets ``m = u`` without any solve or metric map. The long path computes the
    same: ``m_0 = u`` makes the start gradient ``2 c (m_0 − u) uᵀu`` exactly zero, so Adam
    never moves (``m_plain = u``), and ``recolor(whiten(u)) = u`` (``B*^{1/2} B*^{-1/2} = I``
    on the union basis: ``B* = B_1`` has eigenvalues ≥ ε, so the floor does not bite), hence
    ``m_rel = u`` and ``α m_rel + (1−α) m_plain = u``. Its barycenter is not run when no
    element has two active deltas. Inside each solve, elements whose start gradient is
    exactly zero skip the Adam loop (:func:`cpt.merging.inner_solver.adam_displacement`).
    A branch of weight 0 is never computed (``α ≤ skip_tol`` or ``α ≥ 1 − skip_tol``).

    ``recolor(Σ_i whiten(v_i))`` is evaluated as
    ``Σ v_i + (Σ v_i) Q (B*^{1/2} B*^{-1/2} − I) Qᵀ`` (an identity), so that ``m_0`` never
    passes through the float32 whitened space; only the Adam displacement does.

    Returns:
        ``(m, stats)``: ``m`` the merged delta ``[..., d_out, d_in]`` in the working
        precision (float64 for float64 inputs, else float32); ``stats`` per batch
        element ``[...]``: ``conflict`` (float64), ``alpha`` (the gate value, float64),
        ``union_rank`` (long), ``branch`` (0 plain, 1 relation, 2 both), ``norm_merged``
        (float64), ``norm_inputs`` (``[..., n]`` float64), ``bary_iters`` (long; 0 for
        ``metric="mean"``), ``active`` (long, number of deltas kept). With ``diagnostics``,
        what the merge did (METHOD §2.10, float64, NaN where undefined or not computed): ``dev_sum``
        ``‖m − s‖/‖s‖`` with ``s = Σ w_i v_i``, ``dev_sum_plain`` / ``dev_sum_relation`` the
        same for each computed branch, ``displacement_plain`` / ``displacement_relation``
        the inner solve's ``‖Δ‖/‖m_0‖`` (the relation branch's in the whitened space where
        it runs). An element taking the one-delta shortcut computes no branch.
    """
    params = params if params is not None else GCWMParams()
    deltas = list(deltas)
    shape, dtype = check_deltas(deltas)
    count = len(deltas)
    work_dtype = compute_dtype_for(dtype)
    batch_shape = shape[:-2]
    d_out, d_in = shape[-2:]
    weights = check_weights(weights, count)
    kept = [i for i in range(count) if weights[i] > 0]  # weight 0: not in the active set
    flat = [deltas[i].reshape(-1, d_out, d_in).to(work_dtype) for i in kept]
    f64 = torch.float64
    geo = _geometry(flat, [weights[i] for i in kept], params, exact_shortcuts)
    active_weights, squared_norms = geo.weights, geo.squared_norms
    union, union_rank = geo.basis, geo.union_rank
    shared_metric, conflict, alpha, branch = geo.metric, geo.conflict, geo.alpha, geo.branch
    max_rank = union.shape[-1]

    # 6./7. The two inner solves, each only on the elements that need it.
    plain_sum = flat[0].clone()
    for delta in flat[1:]:
        plain_sum.add_(delta)
    merged = torch.zeros_like(plain_sum)
    # What the merge did (METHOD §2.10): NaN where a branch was not computed.
    record = diagnostics  # the keyword; branch_records holds the per-branch values
    weighted_sum = weighted_plain_sum(flat, [weights[i] for i in kept]) if record else None  # s = Σ w_i v_i
    not_computed = torch.full((plain_sum.shape[0],), math.nan, dtype=f64, device=plain_sum.device)
    branch_records = (
        {
            key: not_computed.clone()
            for key in ("dev_sum_plain", "dev_sum_relation", "displacement_plain", "displacement_relation")
        }
        if record
        else {}
    )
    # One active delta (or none): the merge is that delta (or 0), exactly; see the docstring.
    single = (active_weights > 0).sum(-1) <= 1
    solve = ~single if exact_shortcuts else torch.ones_like(single)
    need_plain = (branch != BRANCH_RELATION) & solve
    need_relation = (branch != BRANCH_PLAIN) & solve

    def inverse_square_coefficients(weights: Tensor, squared: Tensor) -> Tensor:
        # w_i / ‖v_i‖²: each branch's inner objective weighs its vectors by their inverse squared norm (0 where w_i = 0).
        return torch.where(weights > 0, weights / squared.clamp_min(torch.finfo(f64).tiny), torch.zeros_like(weights))

    def inner_adam(vectors: list[Tensor], coef: Tensor) -> tuple[Tensor, Tensor]:
        # Both branches run the same inner solver, with the same settings.
        return adam_displacement(
            vectors, coef, params.lr, params.iters, adam_dtype, loop_tf32=loop_tf32, skip_stationary=exact_shortcuts
        )

    coef_plain = inverse_square_coefficients(active_weights, squared_norms)

    def select(values: Tensor, mask: Tensor) -> Tensor:
        return values if bool(mask.all()) else values[mask]

    def put(values: Tensor, mask: Tensor, scale: Tensor | None) -> None:
        if scale is not None:
            values = values * scale.to(work_dtype).view(-1, 1, 1)
        if bool(mask.all()):
            merged.add_(values)
        else:
            merged[mask] += values

    if exact_shortcuts and bool(single.any()):
        put(select(plain_sum, single), single, None)

    if bool(need_plain.any()):
        selected = [select(delta, need_plain) for delta in flat]
        start_plain, displacement_plain = inner_adam(selected, select(coef_plain, need_plain))
        if record:
            branch_records["displacement_plain"][need_plain] = relative_norm(displacement_plain, start_plain)
        m_plain = start_plain.add_(displacement_plain.to(work_dtype))
        if record:
            branch_records["dev_sum_plain"][need_plain] = relative_change(m_plain, select(weighted_sum, need_plain))
        del selected, displacement_plain
        alpha_sel = select(alpha, need_plain)
        branch_sel = select(branch, need_plain)
        put(m_plain, need_plain, torch.where(branch_sel == BRANCH_BOTH, 1.0 - alpha_sel, torch.ones_like(alpha_sel)))
        del m_plain

    if bool(need_relation.any()):
        # 5. Metric maps from B* (float64 roots; inverse root floored at ε).
        rank_sel = select(union_rank, need_relation)
        metric_sel = select(shared_metric, need_relation)
        union_sel = select(union, need_relation)
        root = psd_sqrt(metric_sel, 0.0, dims=rank_sel)
        inv_root = psd_inv_sqrt(metric_sel, params.eps, dims=rank_sel)
        eye_valid = torch.diag_embed(valid_mask(rank_sel, max_rank).to(f64))
        sqrt_eps = math.sqrt(params.eps)
        union_work = union_sel.to(work_dtype)
        union_work_t = union_work.mT
        whiten_in = inv_root.to(work_dtype)  # x ↦ (xQ) B^{-1/2} Qᵀ + ε^{-1/2}(x − xQQᵀ)
        recolor_in = ((root - sqrt_eps * eye_valid) @ union_sel.mT).to(work_dtype)  # [B, K, d_in]
        identity_fix = ((root @ inv_root - eye_valid) @ union_sel.mT).to(work_dtype)  # recolor∘whiten − id

        whitened = []
        for delta in flat:
            rows = select(delta, need_relation)
            rows_in_union = rows @ union_work
            residual = torch.baddbmm(rows, rows_in_union, union_work_t, alpha=-1.0)  # x − xQQᵀ
            whitened.append(torch.baddbmm(residual, rows_in_union @ whiten_in, union_work_t, beta=1.0 / sqrt_eps))
            del residual, rows_in_union
        squared_whitened = torch.stack(
            [torch.linalg.vector_norm(vector, dim=(-2, -1), dtype=f64).square() for vector in whitened], -1
        )
        weights_sel = select(active_weights, need_relation)
        coef_relation = inverse_square_coefficients(weights_sel, squared_whitened)
        start_whitened, displacement_relation = inner_adam(whitened, coef_relation)
        if record:
            branch_records["displacement_relation"][need_relation] = relative_norm(
                displacement_relation, start_whitened
            )
        del whitened, start_whitened
        start_relation = select(plain_sum, need_relation)
        # recolor(Σ u_i + Δ) = Σ v_i + (Σ v_i) Q (B^{1/2}B^{-1/2} − I) Qᵀ + recolor(Δ)
        m_relation = torch.baddbmm(start_relation, start_relation @ union_work, identity_fix)
        displacement_relation = displacement_relation.to(work_dtype)
        m_relation.add_(
            torch.baddbmm(displacement_relation, displacement_relation @ union_work, recolor_in, beta=sqrt_eps)
        )
        del displacement_relation
        if record:
            branch_records["dev_sum_relation"][need_relation] = relative_change(
                m_relation, select(weighted_sum, need_relation)
            )
        alpha_sel = select(alpha, need_relation)
        branch_sel = select(branch, need_relation)
        put(m_relation, need_relation, torch.where(branch_sel == BRANCH_BOTH, alpha_sel, torch.ones_like(alpha_sel)))
        del m_relation

    norm_inputs = torch.zeros(squared_norms.shape[0], count, dtype=f64, device=squared_norms.device)
    norm_inputs[:, kept] = squared_norms.sqrt()
    if len(kept) < count:
        for i in range(count):
            if weights[i] == 0:
                norm_inputs[:, i] = torch.linalg.vector_norm(
                    deltas[i].reshape(-1, d_out, d_in), dim=(-2, -1), dtype=f64
                )
    stats = {
        "conflict": conflict,
        "alpha": alpha,
        "union_rank": union_rank.to(torch.long),
        "branch": branch,
        "norm_merged": torch.linalg.vector_norm(merged, dim=(-2, -1), dtype=f64),
        "norm_inputs": norm_inputs,
        "bary_iters": geo.bary_iters,
        "active": (active_weights > 0).sum(-1),
        **({"dev_sum": relative_change(merged, weighted_sum)} if record else {}),
        **branch_records,
    }
    del weighted_sum
    stats = {
        name: (value.reshape(*batch_shape, count) if name == "norm_inputs" else value.reshape(batch_shape))
        for name, value in stats.items()
    }
    return merged.reshape(shape), stats
