"""GCWM — Geometry-Conflict Wasserstein Merging (METHOD.md §2), data-free.

Tensor-in, tensor-out: no files, no HF objects, no globals. Every function works on one
*target* tensor batched over leading dimensions: all deltas of one call are
``[..., d_out, d_in]`` with the same shape (typically the same projection of every
transformer block stacked), and every batch element is merged exactly as it would be on
its own. Results follow the inputs' device (CPU or CUDA).

Entry points:

- :class:`GCWMParams` — the METHOD §2 parameter table;
- :func:`gcwm_merge` — METHOD §2 steps 1–7 for one active set;
- :func:`gcwm_continual_step` — METHOD §2.8, one continual step (both memory modes);
- :func:`adam_merge` — the plain inner solve of METHOD §2.6 (also WUDI, METHOD §3);
- :func:`gcwm_non_target_step` — the documented ``non_target`` options.

Precision: right bases, union basis, covariances, barycenter, conflict and the metric
roots are float64 (``cpt.geometry``). The large products (whitening, the objective's
Gram matrices) run in the deltas' working precision (float64 for float64 deltas, float32
otherwise, :func:`cpt.geometry.compute_dtype_for`), and the Adam loop in float32 by
default (``adam_dtype``). The loop is written so that float32 loses nothing that matters:
see :func:`_adam_displacement`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal, get_args, get_type_hints

import torch
from torch import Tensor

from ..geometry import (
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
from .pipeline import MergeResult, MergeStrategy, TensorBatch
from ..strategies import register_strategy

__all__ = [
    "BRANCH_BOTH",
    "BRANCH_PLAIN",
    "BRANCH_RELATION",
    "GCWMGeometry",
    "GCWMParams",
    "adam_merge",
    "gcwm_continual_step",
    "gcwm_geometry",
    "gcwm_merge",
    "gcwm_non_target_step",
    "inner_gradient",
    "inner_objective",
    "step_coefficient",
]

#: ``stats["branch"]`` codes (METHOD §2.7).
BRANCH_PLAIN, BRANCH_RELATION, BRANCH_BOTH = 0, 1, 2

#: Adam constants fixed by METHOD §2.6 (torch defaults; no weight decay).
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


# --------------------------------------------------------------------------- parameters


@dataclass
class GCWMParams:
    """GCWM parameters, names and defaults exactly as in METHOD §2's table.

    Validate untrusted input (recipes, ``--set``) with ``pydantic.TypeAdapter(GCWMParams)``:
    the ``Literal`` fields reject unknown modes and ``__post_init__`` checks ranges (it
    also runs on direct construction, so bad values never reach the math).

    Attributes:
        rank: cap on the right-basis rank per delta (§1/§2.1; merging default 16).
        energy: energy threshold of the right basis, in (0, 1] (§1; 0.9).
        eps: covariance ridge ε (§1) — also the eigenvalue floor of inverse roots (§2.2)
            and the metric maps' scale on the complement of the union basis (§2.5).
        metric: shared metric ``B*`` (§2.2): ``"barycenter"`` (W2 fixed point) or
            ``"mean"`` (``Σ ŵ_i B_i``, ablation).
        bary_iters: fixed-point iteration cap (§2.2; 50).
        bary_tol: stop when ``‖B_new − B‖_F / ‖B‖_F < bary_tol`` (§2.2; 1e-5).
        gate: ``"conflict"`` (α from the layer conflict, §2.4) or ``"none"`` (α = 1).
        gate_threshold: the gate centre ``c0`` (§2.4; 0.12).
        gate_sharpness: the gate slope ``s`` (§2.4; 12).
        alpha_min: lower end of the gate range (§2.4; 0.15).
        alpha_max: upper end of the gate range (§2.4; 0.95).
        skip_tol: branch skipping (§2.7): plain branch only when ``α ≤ skip_tol``,
            relation branch only when ``α ≥ 1 − skip_tol`` (METHOD: 0.05 and 0.95).
        iters: Adam iterations of the inner solve (§2.6; 100). The early stop is part of
            the method.
        lr: Adam learning rate of the inner solve (§2.6; 1e-5).
        eig_floor: floor on eigenvalues inside Bures roots (barycenter and conflict);
            0 = exact (§1); the reference merge code uses ε.
        memory: active set of a continual step (§2.8): ``"current_anchor"``
            (``[m_{t−1}, τ_t]``) or ``"all_history"`` (``[τ_1 … τ_t]``).
        memory_size: for ``all_history``, keep the last N task vectors (including
            ``τ_t``); -1 keeps all history.
        old_weight: weight of ``m_{t−1}`` in ``current_anchor`` (1.0; 0 removes it from
            the active set).
        new_weight: weight of ``τ_t`` in ``current_anchor`` (1.0; must be positive).
        step_coef: ``c_t = step_coef · decay^{t−1}`` (§2.8; reference scripts 0.2).
        decay: see ``step_coef`` (1.0).
        non_target: what non-target tensors (embeddings, norms, biases, lm_head) become
            (§2.8), applied by :func:`gcwm_non_target_step`:
            ``"base"`` keeps ``θ0`` (the reference); ``"task_arithmetic"`` moves them by
            ``θ_t = θ_{t−1} + c_t τ_t`` (the same ``c_t`` as target tensors);
            ``"average"`` uses the running mean of the experts,
            ``θ_t = θ0 + (1/t) Σ_{s≤t} τ_s`` (weight averaging, METHOD §3).
        history_rank: cpt's extension, not in METHOD's table: keep ``all_history``'s task
            vectors as rank-``history_rank`` factors (their top right singular directions)
            instead of dense, to bound disk and RAM; -1 (default) keeps them dense and
            exact. The relative error ‖τ − τ_r‖/‖τ‖ is reported per tensor.
    """

    rank: int = 16
    energy: float = 0.9
    eps: float = 1e-6
    metric: Literal["barycenter", "mean"] = "barycenter"
    bary_iters: int = 50
    bary_tol: float = 1e-5
    gate: Literal["conflict", "none"] = "conflict"
    gate_threshold: float = 0.12
    gate_sharpness: float = 12.0
    alpha_min: float = 0.15
    alpha_max: float = 0.95
    skip_tol: float = 0.05
    iters: int = 100
    lr: float = 1e-5
    eig_floor: float = 0.0
    memory: Literal["current_anchor", "all_history"] = "current_anchor"
    memory_size: int = -1
    old_weight: float = 1.0
    new_weight: float = 1.0
    step_coef: float = 0.2
    decay: float = 1.0
    non_target: Literal["base", "task_arithmetic", "average"] = "base"
    history_rank: int = -1

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            options = get_args(hints[f.name])
            if options and value not in options:
                raise ValueError(f"GCWMParams.{f.name} must be one of {options}, got {value!r}")
        problems = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        for name in ("energy", "eps", "bary_tol", "gate_threshold", "gate_sharpness",
                     "alpha_min", "alpha_max", "skip_tol", "lr", "eig_floor",
                     "old_weight", "new_weight", "step_coef", "decay"):
            need(math.isfinite(float(getattr(self, name))), f"{name} must be finite")
        need(self.rank >= 1, "rank must be >= 1")
        need(0.0 < self.energy <= 1.0, "energy must be in (0, 1]")
        need(self.eps > 0.0, "eps must be > 0")
        need(self.bary_iters >= 0, "bary_iters must be >= 0")
        need(self.bary_tol >= 0.0, "bary_tol must be >= 0")
        need(0.0 <= self.alpha_min <= self.alpha_max <= 1.0,
             "need 0 <= alpha_min <= alpha_max <= 1")
        need(0.0 <= self.skip_tol < 0.5, "skip_tol must be in [0, 0.5)")
        need(self.iters >= 0, "iters must be >= 0")
        need(self.lr >= 0.0, "lr must be >= 0")
        need(self.eig_floor >= 0.0, "eig_floor must be >= 0")
        need(self.memory_size == -1 or self.memory_size >= 1, "memory_size must be -1 or >= 1")
        need(self.history_rank == -1 or self.history_rank >= 1, "history_rank must be -1 or >= 1")
        need(self.old_weight >= 0.0, "old_weight must be >= 0 (0 drops m_{t-1})")
        need(self.new_weight > 0.0, "new_weight must be > 0")
        need(self.decay >= 0.0, "decay must be >= 0")
        if problems:
            raise ValueError("invalid GCWMParams: " + "; ".join(problems))


# --------------------------------------------------------------------------- helpers


def _check_deltas(deltas: Sequence[Tensor], what: str = "deltas") -> tuple[torch.Size, torch.dtype]:
    if len(deltas) == 0:
        raise ValueError(f"{what}: need at least one tensor")
    shape = deltas[0].shape
    device = deltas[0].device
    for d in deltas:
        if not isinstance(d, Tensor):
            raise TypeError(f"{what}: expected tensors, got {type(d).__name__}")
        if not d.is_floating_point():
            raise TypeError(f"{what}: expected floating-point tensors, got {d.dtype}")
        if d.dim() < 2:
            raise ValueError(f"{what}: tensors must be [..., d_out, d_in], got {tuple(d.shape)}")
        if d.shape != shape:
            raise ValueError(f"{what}: all tensors must have the same shape, got "
                             f"{tuple(shape)} and {tuple(d.shape)}")
        if d.device != device:
            raise ValueError(f"{what}: all tensors must be on one device")
    dtype = deltas[0].dtype
    for d in deltas[1:]:
        dtype = torch.promote_types(dtype, d.dtype)
    return shape, dtype


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for {n} deltas")
    if any(not math.isfinite(x) or x < 0.0 for x in w):
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    if not any(x > 0.0 for x in w):
        raise ValueError("at least one weight must be positive")
    return w


def _fused_adam_available(t: Tensor) -> bool:
    # torch._fused_adam_ implements torch.optim.Adam(fused=True): the same update rule in
    # one kernel (10× less time than the op-by-op update on CPU). Fall back to the
    # op-by-op rule of torch.optim.Adam's single-tensor path where it is unavailable.
    return hasattr(torch, "_fused_adam_") and t.device.type in ("cpu", "cuda")


@contextlib.contextmanager
def _cuda_tf32(enabled: bool):
    """Let CUDA float32 matmuls use TF32 inside the block (restored afterwards)."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9 API
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = before
    else:
        before = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            yield
        finally:
            matmul.allow_tf32 = before


def _adam_update_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float
) -> None:
    """One step of ``torch.optim.Adam`` (betas 0.9/0.999, eps 1e-8, no weight decay,
    bias correction), op for op as ``torch.optim.adam._single_tensor_adam`` (METHOD §2.6)."""
    exp_avg.lerp_(grad, 1 - ADAM_BETA1)
    exp_avg_sq.mul_(ADAM_BETA2).addcmul_(grad, grad, value=1 - ADAM_BETA2)
    bias_correction1 = 1 - ADAM_BETA1**step
    bias_correction2 = 1 - ADAM_BETA2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(ADAM_EPS)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _adam_displacement(
    vectors: Sequence[Tensor], coef: Tensor, lr: float, iters: int, dtype: torch.dtype,
    fused: bool | None = None, loop_tf32: bool = False,
) -> tuple[Tensor, Tensor]:
    """Adam on ``L(m) = Σ_i w_i ‖(m − u_i) u_iᵀ‖_F² / ‖u_i‖_F²`` from ``m_0 = Σ u_i``
    (METHOD §2.6), batched.

    ``vectors``: n tensors ``[B, d_out, d_in]`` (one working dtype); ``coef``: ``[B, n]``
    float64, ``w_i / ‖u_i‖²`` (0 drops a vector from the objective). Returns
    ``(m_0 [B, d_out, d_in] in the vectors' dtype, Δ [B, d_out, d_in] in dtype)`` with
    the Adam iterate ``m = m_0 + Δ``.

    The gradient is ``∇L(m) = 2 Σ_i c_i (m − u_i) u_iᵀ u_i = 2 (m G − H)``,
    ``G = Σ_i c_i u_iᵀ u_i``, ``H = Σ_i c_i u_i u_iᵀ u_i``, ``c_i = w_i/‖u_i‖²``. It is
    evaluated as ``∇L(m_0 + Δ) = g_0 + 2 Δ G`` with
    ``g_0 = 2 Σ_i c_i (m_0 − u_i)(u_iᵀ u_i)`` computed once in the working precision:
    ``m_0 − u_i = Σ_{j≠i} u_j`` involves no cancellation, and the per-step product only
    touches the small displacement ``Δ`` (about lr per entry per step), so the float32 rounding
    is relative to ``‖Δ G‖`` rather than to ``‖m G‖ ≈ ‖H‖`` as in ``2(mG − H)``. Each
    step is one batched ``d_out×d_in×d_in`` product (``baddbmm``) and one fused Adam
    update — no Python-level per-tensor work.

    ``loop_tf32`` (CUDA only, opt-in): run the per-step product ``Δ G`` with TF32 tensor
    cores (about 8× the float32 throughput of an H100). Because that product only
    carries the displacement term, its ~1e-3 relative rounding barely reaches the
    result: with TF32 rounding emulated on CPU, the fidelity cases of
    ``tests/merging/test_gcwm_fidelity.py`` stay at 8e-7 relative (3.8e-7 in float32)
    and a 512×256 low-rank-plus-noise merge changes by 1.4e-7 relative. Not yet measured
    on a GPU. Everything outside the loop stays in strict float32/float64.
    """
    m0 = vectors[0].clone()
    for u in vectors[1:]:
        m0.add_(u)
    bsz, d_out, d_in = m0.shape
    wdt = m0.dtype
    gram_sum = torch.zeros(bsz, d_in, d_in, dtype=wdt, device=m0.device)
    g0 = torch.zeros_like(m0)
    for i, u in enumerate(vectors):
        c = coef[:, i].to(wdt).view(bsz, 1, 1)
        if not bool((c != 0).any()):
            continue
        gram = u.mT @ u
        gram.mul_(c)
        gram_sum.add_(gram)
        g0.baddbmm_(m0 - u, gram)
    g0.mul_(2.0)
    delta = torch.zeros(bsz, d_out, d_in, dtype=dtype, device=m0.device)
    if iters <= 0:
        return m0, delta
    gram_sum = gram_sum.to(dtype)
    g0 = g0.to(dtype)
    grad = g0.clone()
    exp_avg = torch.zeros_like(delta)
    exp_avg_sq = torch.zeros_like(delta)
    use_fused = _fused_adam_available(delta) if fused is None else fused
    step_t = torch.zeros((), dtype=torch.float32, device=delta.device)
    with _cuda_tf32(loop_tf32 and delta.is_cuda):
        _adam_loop(delta, grad, g0, gram_sum, exp_avg, exp_avg_sq, step_t, lr, iters, use_fused)
    return m0, delta


def _adam_loop(delta, grad, g0, gram_sum, exp_avg, exp_avg_sq, step_t, lr, iters, use_fused):
    """``iters`` Adam steps on ``Δ`` with ``∇ = g_0 + 2 Δ G`` (METHOD §2.6), in place."""
    for step in range(1, iters + 1):
        if step > 1:  # at step 1, Δ = 0 and the gradient is g_0
            torch.baddbmm(g0, delta, gram_sum, alpha=2.0, out=grad)
        if use_fused:
            try:
                step_t.add_(1.0)
                torch._fused_adam_(
                    [delta], [grad], [exp_avg], [exp_avg_sq], [], [step_t],
                    lr=lr, beta1=ADAM_BETA1, beta2=ADAM_BETA2, weight_decay=0.0,
                    eps=ADAM_EPS, amsgrad=False, maximize=False,
                )
                continue
            except (RuntimeError, NotImplementedError):
                if step > 1:
                    raise
                use_fused = False  # not supported here: fall back before any state exists
                exp_avg.zero_()
                exp_avg_sq.zero_()
                delta.zero_()
        _adam_update_(delta, grad, exp_avg, exp_avg_sq, step, lr)


def adam_merge(
    vectors: Sequence[Tensor],
    weights: Sequence[float],
    lr: float = 1e-5,
    iters: int = 100,
    *,
    adam_dtype: torch.dtype = torch.float32,
    loop_tf32: bool = False,
) -> Tensor:
    """The plain inner merge of METHOD §2.6 on raw vectors (no metric).

    Minimises ``L(m) = Σ_i w_i ‖(m − u_i) u_iᵀ‖_F² / ‖u_i‖_F²`` by ``iters`` steps of
    torch's Adam (betas 0.9/0.999, eps 1e-8, no weight decay, bias correction) with
    learning rate ``lr``, from ``m = Σ_i u_i``. Vectors are ``[..., d_out, d_in]``
    (batched, same shape); the loop runs in ``adam_dtype`` (see
    :func:`_adam_displacement` for why float32 suffices, and for ``loop_tf32``).

    A zero vector (``‖u_i‖ = 0``) drops its term from ``L`` (the term is ``0/0``) and
    adds nothing to ``m_0``. A zero weight removes the vector from the set altogether
    (also from ``m_0``); at least one weight must be positive. If every vector is zero
    the gradient is 0 and ``m = 0``.

    WUDI (METHOD §3) is ``adam_merge([θ_{t−1} − θ0, τ_t], [1, 1], lr=1e-5, iters=50)``.
    Returns ``[..., d_out, d_in]`` in the working precision (float64 for float64 inputs,
    float32 otherwise).
    """
    vectors = list(vectors)
    shape, dtype = _check_deltas(vectors, "vectors")
    w = _check_weights(weights, len(vectors))
    vectors = [v for v, wi in zip(vectors, w) if wi > 0]  # weight 0: not in the set
    w = [wi for wi in w if wi > 0]
    cdt = compute_dtype_for(dtype)
    d_out, d_in = shape[-2:]
    flat = [v.reshape(-1, d_out, d_in).to(cdt) for v in vectors]
    sq = torch.stack([torch.linalg.vector_norm(v, dim=(-2, -1), dtype=torch.float64).square()
                      for v in flat], -1)
    w_t = torch.tensor(w, dtype=torch.float64, device=sq.device)
    coef = torch.where(sq > 0, w_t / sq.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(sq))
    m0, delta = _adam_displacement(flat, coef, lr, iters, adam_dtype, loop_tf32=loop_tf32)
    return (m0 + delta.to(cdt)).reshape(shape)


def _objective_coefs(vectors: Sequence[Tensor], weights: Sequence[float]) -> list[Tensor]:
    """``c_i = w_i / ‖u_i‖²`` as ``[..., 1, 1]`` (0 for a zero vector: term dropped)."""
    w = _check_weights(weights, len(vectors))
    coefs = []
    for wi, u in zip(w, vectors):
        sq = torch.linalg.vector_norm(u.detach(), dim=(-2, -1), dtype=torch.float64).square()
        c = torch.where(sq > 0, wi / sq.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(sq))
        coefs.append(c.to(u.dtype)[..., None, None])
    return coefs


def inner_objective(m: Tensor, vectors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``L(m) = Σ_i w_i ‖(m − u_i) u_iᵀ‖_F² / ‖u_i‖_F²`` per batch element (METHOD §2.6);
    zero vectors contribute 0 (dropped). Differentiable (for checks with autograd)."""
    coefs = _objective_coefs(vectors, weights)
    total = m.new_zeros(m.shape[:-2])
    for c, u in zip(coefs, vectors):
        total = total + c[..., 0, 0] * ((m - u) @ u.mT).square().sum((-2, -1))
    return total


def inner_gradient(m: Tensor, vectors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``∇L(m) = 2 (m G − H)``, ``G = Σ_i w_i u_iᵀu_i/‖u_i‖²``,
    ``H = Σ_i w_i u_i u_iᵀu_i/‖u_i‖²`` (METHOD §2.6; derivation: ``∂‖(m−u)uᵀ‖²/∂m =
    2 (m−u) uᵀu``). The Adam loop evaluates the same gradient as
    ``g_0 + 2 (m − m_0) G`` (see :func:`_adam_displacement`)."""
    coefs = _objective_coefs(vectors, weights)
    d_in = m.shape[-1]
    gram = m.new_zeros(*m.shape[:-2], d_in, d_in)
    h = torch.zeros_like(m)
    for c, u in zip(coefs, vectors):
        g_i = c * (u.mT @ u)
        gram = gram + g_i
        h = h + u @ g_i
    return 2.0 * (m @ gram - h)


# --------------------------------------------------------------------------- GCWM


def _gate(conflict: Tensor, p: GCWMParams) -> Tensor:
    """METHOD §2.4: ``α = α_min + (α_max − α_min) σ(s (c − c0))``; ``gate="none"`` ⇒ α = 1."""
    if p.gate == "none":
        return torch.ones_like(conflict)
    return p.alpha_min + (p.alpha_max - p.alpha_min) * torch.sigmoid(
        p.gate_sharpness * (conflict - p.gate_threshold)
    )


def _branch(alpha: Tensor, p: GCWMParams) -> Tensor:
    """METHOD §2.7: plain only when ``α ≤ skip_tol`` (0.05), relation only when
    ``α ≥ 1 − skip_tol`` (0.95), both otherwise."""
    both = torch.full_like(alpha, BRANCH_BOTH, dtype=torch.long)
    out = torch.where(alpha >= 1.0 - p.skip_tol, torch.full_like(both, BRANCH_RELATION), both)
    return torch.where(alpha <= p.skip_tol, torch.full_like(both, BRANCH_PLAIN), out)


def _layer_conflict(covs: Tensor, w_eff: Tensor, k: Tensor, eig_floor: float) -> Tensor:
    """METHOD §2.3: ``c = Σ_{i<j} w_i w_j GC(B_i, B_j) / Σ_{i<j} w_i w_j``.

    ``covs [B, n, K, K]``, ``w_eff [B, n]`` (0 for dropped deltas). With fewer than two
    active deltas there is no pair and ``c = 0`` (a single geometry does not conflict
    with itself: ``GC(B, B) = 0``).
    """
    bsz, n = w_eff.shape
    if n < 2:
        return torch.zeros(bsz, dtype=torch.float64, device=covs.device)
    ii, jj = torch.triu_indices(n, n, offset=1, device=covs.device)
    pw = w_eff[:, ii] * w_eff[:, jj]  # [B, P]
    npairs = ii.numel()
    if covs.shape[-1] == 0:
        return torch.zeros(bsz, dtype=torch.float64, device=covs.device)
    gc = covariance_conflict(
        covs[:, ii], covs[:, jj], eig_floor=eig_floor, dims=k.unsqueeze(-1).expand(bsz, npairs)
    )
    gc = torch.where(pw > 0, gc, torch.zeros_like(gc))
    num = (pw * gc).sum(-1)
    den = pw.sum(-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(num))


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


def _geometry(v: list[Tensor], w: list[float], p: GCWMParams) -> GCWMGeometry:
    """METHOD §2 steps 1–4 on flattened deltas ``v_i [B, d_out, d_in]``."""
    f64 = torch.float64
    bsz, n = v[0].shape[0], len(v)
    device = v[0].device

    # 1. Right bases, union basis, projected covariances (METHOD §1 / §2.1).
    bases = [right_basis(vi, p.rank, p.energy) for vi in v]
    sq_norms = torch.stack([b.squared_norm for b in bases], -1).to(f64)  # [B, n]
    w_t = torch.tensor(w, dtype=f64, device=device).expand(bsz, n)
    w_eff = torch.where(sq_norms > 0, w_t, torch.zeros_like(w_t))  # dropped: weight 0
    q, k = union_basis(bases)  # [B, d_in, K], [B]
    kmax = q.shape[-1]
    covs = torch.stack([projected_covariance(q, k, b, p.eps) for b in bases], -3)

    # 2. Shared metric B* (METHOD §2.2), weights normalised (ŵ = w/Σw) in both modes.
    has_active = w_eff.sum(-1) > 0
    w_metric = torch.where(has_active.unsqueeze(-1), w_eff, torch.ones_like(w_eff))
    if kmax == 0:
        bstar = torch.zeros(bsz, 0, 0, dtype=f64, device=device)
        bary_used = torch.zeros(bsz, dtype=torch.long, device=device)
    elif p.metric == "barycenter":
        bstar, bary_used = wasserstein_barycenter(
            covs, w_metric, iters=p.bary_iters, tol=p.bary_tol, eps=p.eps,
            eig_floor=p.eig_floor, dims=k,
        )
    else:
        w_hat = w_metric / w_metric.sum(-1, keepdim=True)
        bstar = (w_hat[..., None, None] * covs).sum(-3)
        bary_used = torch.zeros(bsz, dtype=torch.long, device=device)

    # 3. Layer conflict, 4. gate, 7. branch choice.
    conflict = _layer_conflict(covs, w_eff, k, p.eig_floor)
    alpha = _gate(conflict, p)
    return GCWMGeometry(
        basis=q, union_rank=k.to(torch.long), covariances=covs, metric=bstar,
        bary_iters=bary_used.to(torch.long), weights=w_eff, squared_norms=sq_norms,
        conflict=conflict, alpha=alpha, branch=_branch(alpha, p),
    )


def gcwm_geometry(
    deltas: Sequence[Tensor], weights: Sequence[float], params: GCWMParams | None = None
) -> GCWMGeometry:
    """METHOD §2 steps 1–4 only (bases, union, ``B_i``, ``B*``, conflict, gate, branch),
    for deltas ``[..., d_out, d_in]``; fields are flattened over the batch (``[B, ...]``,
    ``B = prod(...)``). :func:`gcwm_merge` computes exactly this first. Deltas with weight
    0 are left out (the ``n`` axis indexes the others)."""
    p = params if params is not None else GCWMParams()
    deltas = list(deltas)
    shape, dtype = _check_deltas(deltas)
    d_out, d_in = shape[-2:]
    w = _check_weights(weights, len(deltas))
    cdt = compute_dtype_for(dtype)
    v = [d.reshape(-1, d_out, d_in).to(cdt) for d, wi in zip(deltas, w) if wi > 0]
    return _geometry(v, [wi for wi in w if wi > 0], p)


def gcwm_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    params: GCWMParams | None = None,
    *,
    adam_dtype: torch.dtype = torch.float32,
    loop_tf32: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Merge one active set of deltas by GCWM (METHOD §2, steps 1–7).

    Args:
        deltas: n ≥ 1 tensors ``[..., d_out, d_in]`` of the same shape (leading dims are a
            batch of independent target tensors), e.g. ``[m_{t−1}, τ_t]``.
        weights: n non-negative ``w_i`` (shared by all batch elements).
        params: :class:`GCWMParams` (defaults if None).
        adam_dtype: precision of the inner Adam loop (float32 by default).
        loop_tf32: CUDA only, opt-in: TF32 for the loop's per-step product (see
            :func:`_adam_displacement`).

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
    6. the inner objective minimised by Adam (:func:`adam_merge`'s solver);
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

    ``recolor(Σ_i whiten(v_i))`` is evaluated as
    ``Σ v_i + (Σ v_i) Q (B*^{1/2} B*^{-1/2} − I) Qᵀ`` (an identity), so that ``m_0`` never
    passes through the float32 whitened space; only the Adam displacement does.

    Returns:
        ``(m, stats)``: ``m`` the merged delta ``[..., d_out, d_in]`` in the working
        precision (float64 for float64 inputs, else float32); ``stats`` per batch
        element ``[...]``: ``conflict`` (float64), ``alpha`` (the gate value, float64),
        ``union_rank`` (long), ``branch`` (0 plain, 1 relation, 2 both), ``norm_merged``
        (float64), ``norm_inputs`` (``[..., n]`` float64), ``bary_iters`` (long; 0 for
        ``metric="mean"``), ``active`` (long, number of deltas kept).
    """
    p = params if params is not None else GCWMParams()
    deltas = list(deltas)
    shape, dtype = _check_deltas(deltas)
    n = len(deltas)
    cdt = compute_dtype_for(dtype)
    batch_shape = shape[:-2]
    d_out, d_in = shape[-2:]
    w = _check_weights(weights, n)
    kept = [i for i in range(n) if w[i] > 0]  # weight 0: not in the active set
    v = [deltas[i].reshape(-1, d_out, d_in).to(cdt) for i in kept]
    f64 = torch.float64
    geo = _geometry(v, [w[i] for i in kept], p)
    w_eff, sq_norms, q, k = geo.weights, geo.squared_norms, geo.basis, geo.union_rank
    bstar, conflict, alpha, branch = geo.metric, geo.conflict, geo.alpha, geo.branch
    kmax = q.shape[-1]

    # 6./7. The two inner solves, each only on the elements that need it.
    m0 = v[0].clone()
    for vi in v[1:]:
        m0.add_(vi)
    merged = torch.zeros_like(m0)
    need_plain = branch != BRANCH_RELATION
    need_rel = branch != BRANCH_PLAIN
    coef_raw = torch.where(w_eff > 0, w_eff / sq_norms.clamp_min(torch.finfo(f64).tiny),
                           torch.zeros_like(w_eff))

    def select(x: Tensor, mask: Tensor) -> Tensor:
        return x if bool(mask.all()) else x[mask]

    def put(values: Tensor, mask: Tensor, scale: Tensor | None) -> None:
        if scale is not None:
            values = values * scale.to(cdt).view(-1, 1, 1)
        if bool(mask.all()):
            merged.add_(values)
        else:
            merged[mask] += values

    if bool(need_plain.any()):
        vs = [select(vi, need_plain) for vi in v]
        m0p, dp = _adam_displacement(vs, select(coef_raw, need_plain), p.lr, p.iters, adam_dtype,
                                      loop_tf32=loop_tf32)
        m_plain = m0p.add_(dp.to(cdt))
        del vs, dp
        a = select(alpha, need_plain)
        b = select(branch, need_plain)
        put(m_plain, need_plain, torch.where(b == BRANCH_BOTH, 1.0 - a, torch.ones_like(a)))
        del m_plain

    if bool(need_rel.any()):
        # 5. Metric maps from B* (float64 roots; inverse root floored at ε).
        kr = select(k, need_rel)
        bs = select(bstar, need_rel)
        qr = select(q, need_rel)
        root = psd_sqrt(bs, 0.0, dims=kr)
        inv_root = psd_inv_sqrt(bs, p.eps, dims=kr)
        eye_valid = torch.diag_embed(valid_mask(kr, kmax).to(f64))
        sqrt_eps = math.sqrt(p.eps)
        q_c = qr.to(cdt)
        qt_c = q_c.mT
        whiten_in = inv_root.to(cdt)  # x ↦ (xQ) B^{-1/2} Qᵀ + ε^{-1/2}(x − xQQᵀ)
        recolor_in = ((root - sqrt_eps * eye_valid) @ qr.mT).to(cdt)  # [B, K, d_in]
        id_fix = ((root @ inv_root - eye_valid) @ qr.mT).to(cdt)  # recolor∘whiten − id

        us = []
        for vi in v:
            x = select(vi, need_rel)
            xq = x @ q_c
            resid = torch.baddbmm(x, xq, qt_c, alpha=-1.0)  # x − xQQᵀ
            us.append(torch.baddbmm(resid, xq @ whiten_in, qt_c, beta=1.0 / sqrt_eps))
            del resid, xq
        sq_u = torch.stack(
            [torch.linalg.vector_norm(u, dim=(-2, -1), dtype=f64).square() for u in us], -1
        )
        w_r = select(w_eff, need_rel)
        coef_rel = torch.where(w_r > 0, w_r / sq_u.clamp_min(torch.finfo(f64).tiny),
                               torch.zeros_like(w_r))
        _, dr = _adam_displacement(us, coef_rel, p.lr, p.iters, adam_dtype, loop_tf32=loop_tf32)
        del us
        m0r = select(m0, need_rel)
        # recolor(Σ u_i + Δ) = Σ v_i + (Σ v_i) Q (B^{1/2}B^{-1/2} − I) Qᵀ + recolor(Δ)
        m_rel = torch.baddbmm(m0r, m0r @ q_c, id_fix)
        dr = dr.to(cdt)
        m_rel.add_(torch.baddbmm(dr, dr @ q_c, recolor_in, beta=sqrt_eps))
        del dr
        a = select(alpha, need_rel)
        b = select(branch, need_rel)
        put(m_rel, need_rel, torch.where(b == BRANCH_BOTH, a, torch.ones_like(a)))
        del m_rel

    norm_inputs = torch.zeros(sq_norms.shape[0], n, dtype=f64, device=sq_norms.device)
    norm_inputs[:, kept] = sq_norms.sqrt()
    if len(kept) < n:
        for i in range(n):
            if w[i] == 0:
                norm_inputs[:, i] = torch.linalg.vector_norm(
                    deltas[i].reshape(-1, d_out, d_in), dim=(-2, -1), dtype=f64)
    stats = {
        "conflict": conflict,
        "alpha": alpha,
        "union_rank": k.to(torch.long),
        "branch": branch,
        "norm_merged": torch.linalg.vector_norm(merged, dim=(-2, -1), dtype=f64),
        "norm_inputs": norm_inputs,
        "bary_iters": geo.bary_iters,
        "active": (w_eff > 0).sum(-1),
    }
    stats = {
        name: (s.reshape(*batch_shape, n) if name == "norm_inputs" else s.reshape(batch_shape))
        for name, s in stats.items()
    }
    return merged.reshape(shape), stats


# --------------------------------------------------------------------------- continual


def step_coefficient(step: int, params: GCWMParams) -> float:
    """``c_t = step_coef · decay^{t−1}`` (METHOD §2.8)."""
    return params.step_coef * params.decay ** (step - 1)


def gcwm_continual_step(
    step: int,
    task_vector: Tensor,
    previous_merged: Tensor | None,
    history: list[Tensor] | None,
    params: GCWMParams | None = None,
    *,
    adam_dtype: torch.dtype = torch.float32,
    loop_tf32: bool = False,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One continual GCWM step for one (batched) target tensor (METHOD §2.8).

    Args:
        step: t ≥ 1.
        task_vector: ``τ_t = E_t − θ0`` ``[..., d_out, d_in]``.
        previous_merged: ``m_{t−1}``, the previous step's *merged delta* (the unscaled
            output of this function at step t−1, not ``θ_{t−1} − θ0``); must be None at
            t = 1 (``m_0`` is absent) and given for t > 1 (both memory modes need it for
            the increment).
        history: ``all_history`` only: the earlier task vectors ``[τ_1 … τ_{t−1}]`` in
            order, *without* ``τ_t`` (at least the last ``memory_size − 1`` of them when
            ``memory_size > 0``; a longer list is cut to the window). Ignored by
            ``current_anchor``.
        params: :class:`GCWMParams`.
        adam_dtype, loop_tf32: as in :func:`gcwm_merge`.

    Active sets: ``current_anchor`` — ``[m_{t−1}, τ_t]`` with weights
    ``(old_weight, new_weight)``, or ``[τ_1]`` (weight ``new_weight``) at t = 1;
    ``all_history`` — ``[τ_1 … τ_t]`` (the last ``memory_size`` when > 0), weights 1.

    Returns:
        ``(m_t, increment, stats)``: ``m_t`` from :func:`gcwm_merge`;
        ``increment = c_t (m_t − m_{t−1})`` with ``m_0 = 0`` and
        ``c_t = step_coef · decay^{t−1}`` — the caller applies
        ``θ_t = θ_{t−1} + increment``; ``stats`` from :func:`gcwm_merge` plus
        ``step_coef`` (``c_t``, float64 scalar).
    """
    p = params if params is not None else GCWMParams()
    if int(step) != step or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step}")
    if step == 1 and previous_merged is not None:
        raise ValueError("previous_merged must be None at step 1 (m_0 is absent)")
    if step > 1 and previous_merged is None:
        raise ValueError(f"previous_merged (m_{{t-1}}) is required at step {step}")
    if previous_merged is not None and previous_merged.shape != task_vector.shape:
        raise ValueError("previous_merged and task_vector must have the same shape")

    if p.memory == "current_anchor":
        if previous_merged is None:
            active, weights = [task_vector], [p.new_weight]
        else:
            active, weights = [previous_merged, task_vector], [p.old_weight, p.new_weight]
    else:
        hist = list(history) if history is not None else []
        if len(hist) > step - 1:
            raise ValueError(
                f"history has {len(hist)} task vectors at step {step}: pass τ_1..τ_(t−1) "
                "without the current task vector"
            )
        needed = step - 1 if p.memory_size < 0 else min(step - 1, p.memory_size - 1)
        if len(hist) < needed:
            raise ValueError(f"all_history at step {step} needs the last {needed} earlier "
                             f"task vectors, got {len(hist)}")
        active = hist[len(hist) - needed:] + [task_vector]
        weights = [1.0] * len(active)

    merged, stats = gcwm_merge(active, weights, p, adam_dtype=adam_dtype, loop_tf32=loop_tf32)
    c_t = step_coefficient(step, p)
    if previous_merged is None:
        increment = c_t * merged
    else:
        increment = c_t * (merged - previous_merged.to(merged.dtype))
    stats["step_coef"] = torch.tensor(c_t, dtype=torch.float64, device=merged.device)
    return merged, increment, stats


def gcwm_non_target_step(
    step: int,
    task_vector: Tensor,
    previous_state_delta: Tensor | None,
    params: GCWMParams | None = None,
) -> Tensor:
    """New ``θ_t − θ0`` of a non-target tensor under ``params.non_target`` (METHOD §2.8).

    ``previous_state_delta`` is ``θ_{t−1} − θ0`` (None or zeros at t = 1);
    ``task_vector`` is ``τ_t``.

    - ``"base"`` (reference): ``θ_t = θ0`` → zeros;
    - ``"task_arithmetic"``: ``θ_t = θ_{t−1} + c_t τ_t``, ``c_t = step_coef·decay^{t−1}``;
    - ``"average"``: ``θ_t = ((t−1) θ_{t−1} + E_t)/t`` — in deltas
      ``((t−1)(θ_{t−1} − θ0) + τ_t)/t``, the running mean of the task vectors when every
      step used this rule.
    """
    p = params if params is not None else GCWMParams()
    if int(step) != step or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step}")
    prev = previous_state_delta if previous_state_delta is not None else torch.zeros_like(task_vector)
    if p.non_target == "base":
        return torch.zeros_like(task_vector)
    if p.non_target == "task_arithmetic":
        return prev + step_coefficient(step, p) * task_vector
    return ((step - 1) * prev + task_vector) / step


# ---------------------------------------------------------------------- the strategy

_STAT_KEYS = ("conflict", "alpha", "union_rank", "branch", "norm_merged", "bary_iters")


@register_strategy(
    "gcwm",
    params=GCWMParams,
    train_from="base",
    description="Geometry-Conflict Wasserstein Merging (METHOD §2): conflict-gated merge in a shared W2 metric",
)
class GCWM(MergeStrategy):
    """GCWM as a continual integration strategy (METHOD §2.8) on the streamed pipeline.

    Kept across steps (``history/step-<t>/``): ``merged`` — m_t per target tensor; with
    ``memory: all_history`` also ``tau_<k>`` — the task vectors still in the window.
    Target tensors: θ_t = θ_{t−1} + c_t (m_t − m_{t−1}); non-target tensors follow
    ``non_target`` (``base`` keeps θ0, as the reference does).
    """

    def _window(self, step: int) -> list[int]:
        """Steps k < t whose τ_k are in step t's active set (all_history)."""
        if self.params.memory != "all_history":
            return []
        needed = step - 1 if self.params.memory_size < 0 else min(step - 1, self.params.memory_size - 1)
        return list(range(step - needed, step))

    def _tau_keys(self, k: int) -> list[str]:
        return [f"tau_{k}.left", f"tau_{k}.right"] if self.params.history_rank > 0 else [f"tau_{k}"]

    def history_keys(self, step: int, scalars: dict) -> list[str]:
        return ["merged", *(key for k in self._window(step) for key in self._tau_keys(k))]

    def _kept_tau(self, batch: TensorBatch, k: int) -> torch.Tensor | None:
        if self.params.history_rank <= 0:
            return batch.history.get(f"tau_{k}")
        left, right = batch.history.get(f"tau_{k}.left"), batch.history.get(f"tau_{k}.right")
        return None if left is None or right is None else left @ right.mT

    def _compress(self, task_vector: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rank-``history_rank`` factors (τ V, V) of τ and the relative error per tensor."""
        basis = right_basis(task_vector, rank=self.params.history_rank, energy=1.0).basis.to(task_vector.dtype)
        left = task_vector @ basis
        error = (task_vector - left @ basis.mT).flatten(1).norm(dim=1) / task_vector.flatten(1).norm(dim=1).clamp_min(1e-30)
        return {"left": left, "right": basis}, error

    def rows_separable(self, target):
        return not target  # non-target rule is element-wise; targets need whole matrices

    def merge(self, batch: TensorBatch) -> MergeResult:
        step = batch.step
        if not batch.target:
            delta = gcwm_non_target_step(step, batch.task_vector, batch.state_delta, self.params)
            norms = (batch.base + delta - batch.state).flatten(1).norm(dim=1)
            return MergeResult(state=batch.base + delta, stats=[{"norm_update": float(n)} for n in norms])
        previous = batch.history.get("merged")
        if step > 1 and previous is None:
            raise ValueError(f"GCWM step {step}: no kept merged delta m_(t-1) for {batch.names[0]}; "
                             "the run's history/ folder is missing or incomplete: rerun with --overwrite")
        earlier = [self._kept_tau(batch, k) for k in self._window(step)]
        if any(tau is None for tau in earlier):
            raise ValueError(f"GCWM step {step}: a kept task vector is missing for {batch.names[0]}")
        merged, increment, stats = gcwm_continual_step(step, batch.task_vector, previous, earlier or None, self.params)
        keep = {"merged": merged}
        history_error = None
        for k in self._window(step + 1):
            if k != step:  # carried forward as stored
                keep.update({key: batch.history[key] for key in self._tau_keys(k)})
            elif self.params.history_rank > 0:
                factors, history_error = self._compress(batch.task_vector)
                keep.update({f"tau_{k}.{part}": value for part, value in factors.items()})
            else:
                keep[f"tau_{k}"] = batch.task_vector
        norms = increment.flatten(1).norm(dim=1)
        per_tensor = []
        for i in range(len(batch.names)):
            row = {key: float(stats[key][i]) for key in _STAT_KEYS if key in stats}
            row["branch"] = ("plain", "relation", "both")[int(stats["branch"][i])]
            row.update(norm_update=float(norms[i]), norm_task_vector=float(batch.task_vector[i].norm()),
                       step_coef=float(stats["step_coef"]))
            if history_error is not None:
                row["history_error"] = float(history_error[i])
            per_tensor.append(row)
        return MergeResult(state=batch.state + increment.to(batch.state.dtype), history=keep, stats=per_tensor)

    def end_step(self, step: int, scalars: dict) -> dict:
        return {"step_coef": step_coefficient(step, self.params), "memory": self.params.memory}
