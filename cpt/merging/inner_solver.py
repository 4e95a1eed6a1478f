"""The inner merge solve shared by GCWM (METHOD §2.6) and WUDI (METHOD §3), data-free.

The objective, for vectors ``u_i [..., d_out, d_in]`` with weights ``w_i``:

    ``L(m) = Σ_i w_i ‖(m − u_i) u_iᵀ‖_F² / ‖u_i‖_F²``

minimised by ``iters`` steps of torch's Adam (betas 0.9/0.999, eps 1e-8, no weight decay,
bias correction) from ``m_0 = Σ_i u_i``. The early stop is part of the method (the exact
minimiser is ill-conditioned, METHOD §2.6).

Entry points:

- :func:`adam_merge` — the solve on raw vectors (GCWM's plain branch, WUDI);
- :func:`adam_displacement` — the batched solver both use, returning ``(m_0, m − m_0)``;
- :func:`inner_objective`, :func:`inner_gradient` — the objective and its gradient, for
  checks (autograd, finite differences);
- :func:`check_deltas`, :func:`check_weights` — input validation shared with GCWM.

Tensor-in, tensor-out: no files, no globals. The Adam loop runs in float32 by default
(``adam_dtype``); :func:`adam_displacement` explains why float32 loses nothing that matters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..geometry import compute_dtype_for

__all__ = [
    "ADAM_BETA1",
    "ADAM_BETA2",
    "ADAM_EPS",
    "adam_displacement",
    "adam_merge",
    "check_deltas",
    "check_weights",
    "inner_gradient",
    "inner_objective",
    "objective_coefficients",
]

#: Adam constants fixed by METHOD §2.6 (torch defaults; no weight decay).
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


# --------------------------------------------------------------------------- input checks


def check_deltas(deltas: Sequence[Tensor], what: str = "deltas") -> tuple[torch.Size, torch.dtype]:
    """Validate n ≥ 1 floating tensors ``[..., d_out, d_in]`` of one shape on one device;
    return ``(shape, promoted dtype)``."""
    if len(deltas) == 0:
        raise ValueError(f"{what}: need at least one tensor")
    shape = deltas[0].shape
    device = deltas[0].device
    for delta in deltas:
        if not isinstance(delta, Tensor):
            raise TypeError(f"{what}: expected tensors, got {type(delta).__name__}")
        if not delta.is_floating_point():
            raise TypeError(f"{what}: expected floating-point tensors, got {delta.dtype}")
        if delta.dim() < 2:
            raise ValueError(f"{what}: tensors must be [..., d_out, d_in], got {tuple(delta.shape)}")
        if delta.shape != shape:
            raise ValueError(
                f"{what}: all tensors must have the same shape, got {tuple(shape)} and {tuple(delta.shape)}"
            )
        if delta.device != device:
            raise ValueError(f"{what}: all tensors must be on one device")
    dtype = deltas[0].dtype
    for delta in deltas[1:]:
        dtype = torch.promote_types(dtype, delta.dtype)
    return shape, dtype


def check_weights(weights: Sequence[float], count: int) -> list[float]:
    """Validate ``count`` finite, non-negative weights, at least one positive."""
    values = [float(x) for x in weights]
    if len(values) != count:
        raise ValueError(f"weights has {len(values)} entries for {count} deltas")
    if any(not math.isfinite(x) or x < 0.0 for x in values):
        raise ValueError(f"weights must be finite and non-negative, got {values}")
    if not any(x > 0.0 for x in values):
        raise ValueError("at least one weight must be positive")
    return values


# --------------------------------------------------------------------------- Adam


def _fused_adam_available(tensor: Tensor) -> bool:
    # torch._fused_adam_ implements torch.optim.Adam(fused=True): the same update rule in
    # one kernel (10× less time than the op-by-op update on CPU). Fall back to the
    # op-by-op rule of torch.optim.Adam's single-tensor path where it is unavailable.
    return hasattr(torch, "_fused_adam_") and tensor.device.type in ("cpu", "cuda")


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


def _adam_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float) -> None:
    """One step of ``torch.optim.Adam`` (betas 0.9/0.999, eps 1e-8, no weight decay,
    bias correction), op for op as ``torch.optim.adam._single_tensor_adam`` (METHOD §2.6)."""
    exp_avg.lerp_(grad, 1 - ADAM_BETA1)
    exp_avg_sq.mul_(ADAM_BETA2).addcmul_(grad, grad, value=1 - ADAM_BETA2)
    bias_correction1 = 1 - ADAM_BETA1**step
    bias_correction2 = 1 - ADAM_BETA2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(ADAM_EPS)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def adam_displacement(
    vectors: Sequence[Tensor],
    coef: Tensor,
    lr: float,
    iters: int,
    dtype: torch.dtype,
    fused: bool | None = None,
    loop_tf32: bool = False,
    skip_stationary: bool = True,
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

    ``skip_stationary`` (default): a batch element whose start gradient ``g_0`` is exactly
    zero is left out of the loop, its ``Δ`` is exactly 0. This is what Adam computes for it
    anyway: with ``g_0 = 0`` the first moments stay 0, the update ``0/(0 + eps)`` is 0, so
    ``Δ`` stays 0 and the gradient ``g_0 + 2ΔG`` stays 0 at every step. It happens whenever
    the set holds one vector (``m_0 − u_1 = 0``; step 1 of a continual run) or vectors with
    mutually orthogonal row spaces. Adam is element-wise and the loop's product is per batch
    element, so the other elements follow the same trajectory (to float rounding, since a
    sub-batch may take another matmul kernel). ``False`` runs the loop on every element.
    """
    start = vectors[0].clone()
    for vector in vectors[1:]:
        start.add_(vector)
    batch_size, d_out, d_in = start.shape
    work_dtype = start.dtype
    gram_sum = torch.zeros(batch_size, d_in, d_in, dtype=work_dtype, device=start.device)
    start_gradient = torch.zeros_like(start)
    for i, vector in enumerate(vectors):
        vector_coef = coef[:, i].to(work_dtype).view(batch_size, 1, 1)
        if not bool((vector_coef != 0).any()):
            continue
        gram = vector.mT @ vector
        gram.mul_(vector_coef)
        gram_sum.add_(gram)
        start_gradient.baddbmm_(start - vector, gram)
    start_gradient.mul_(2.0)
    delta = torch.zeros(batch_size, d_out, d_in, dtype=dtype, device=start.device)
    if iters <= 0:
        return start, delta
    gram_sum = gram_sum.to(dtype)
    start_gradient = start_gradient.to(dtype)
    if skip_stationary:
        moving = start_gradient.flatten(1).ne(0).any(1)
        if not bool(moving.any()):
            return start, delta  # every element stationary: Adam never moves (see above)
        if not bool(moving.all()):
            delta[moving] = _adam_solve(start_gradient[moving], gram_sum[moving], lr, iters, fused, loop_tf32)
            return start, delta
    return start, _adam_solve(start_gradient, gram_sum, lr, iters, fused, loop_tf32)


def _adam_solve(
    start_gradient: Tensor, gram_sum: Tensor, lr: float, iters: int, fused: bool | None, loop_tf32: bool
) -> Tensor:
    """The Adam displacement ``Δ`` from 0 with ``∇ = g_0 + 2 Δ G`` (METHOD §2.6)."""
    delta = torch.zeros_like(start_gradient)
    grad = start_gradient.clone()
    exp_avg = torch.zeros_like(delta)
    exp_avg_sq = torch.zeros_like(delta)
    use_fused = _fused_adam_available(delta) if fused is None else fused
    step_t = torch.zeros((), dtype=torch.float32, device=delta.device)
    with _cuda_tf32(loop_tf32 and delta.is_cuda):
        _adam_loop(delta, grad, start_gradient, gram_sum, exp_avg, exp_avg_sq, step_t, lr, iters, use_fused)
    return delta


def _adam_loop(delta, grad, start_gradient, gram_sum, exp_avg, exp_avg_sq, step_t, lr, iters, use_fused):
    """``iters`` Adam steps on ``Δ`` with ``∇ = g_0 + 2 Δ G`` (METHOD §2.6), in place."""
    for step in range(1, iters + 1):
        if step > 1:  # at step 1, Δ = 0 and the gradient is g_0
            torch.baddbmm(start_gradient, delta, gram_sum, alpha=2.0, out=grad)
        if use_fused:
            try:
                step_t.add_(1.0)
                torch._fused_adam_(
                    [delta],
                    [grad],
                    [exp_avg],
                    [exp_avg_sq],
                    [],
                    [step_t],
                    lr=lr,
                    beta1=ADAM_BETA1,
                    beta2=ADAM_BETA2,
                    weight_decay=0.0,
                    eps=ADAM_EPS,
                    amsgrad=False,
                    maximize=False,
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
    :func:`adam_displacement` for why float32 suffices, and for ``loop_tf32``).

    A zero vector (``‖u_i‖ = 0``) drops its term from ``L`` (the term is ``0/0``) and
    adds nothing to ``m_0``. A zero weight removes the vector from the set altogether
    (also from ``m_0``); at least one weight must be positive. If every vector is zero
    the gradient is 0 and ``m = 0``.

    WUDI (METHOD §3) is ``adam_merge([θ_{t−1} − θ0, τ_t], [1, 1], lr=1e-5, iters=50)``.
    Returns ``[..., d_out, d_in]`` in the working precision (float64 for float64 inputs,
    float32 otherwise).
    """
    vectors = list(vectors)
    shape, dtype = check_deltas(vectors, "vectors")
    weights = check_weights(weights, len(vectors))
    vectors = [vector for vector, weight in zip(vectors, weights) if weight > 0]  # weight 0: not in the set
    weights = [weight for weight in weights if weight > 0]
    work_dtype = compute_dtype_for(dtype)
    d_out, d_in = shape[-2:]
    flat = [vector.reshape(-1, d_out, d_in).to(work_dtype) for vector in vectors]
    squared_norms = torch.stack(
        [torch.linalg.vector_norm(vector, dim=(-2, -1), dtype=torch.float64).square() for vector in flat], -1
    )
    weights_t = torch.tensor(weights, dtype=torch.float64, device=squared_norms.device)
    coef = torch.where(
        squared_norms > 0,
        weights_t / squared_norms.clamp_min(torch.finfo(torch.float64).tiny),
        torch.zeros_like(squared_norms),
    )
    start, delta = adam_displacement(flat, coef, lr, iters, adam_dtype, loop_tf32=loop_tf32)
    return (start + delta.to(work_dtype)).reshape(shape)


# --------------------------------------------------------------------------- objective (for checks)


def objective_coefficients(vectors: Sequence[Tensor], weights: Sequence[float]) -> list[Tensor]:
    """``c_i = w_i / ‖u_i‖²`` as ``[..., 1, 1]`` (0 for a zero vector: term dropped; METHOD §2.6)."""
    weights = check_weights(weights, len(vectors))
    coefs = []
    for weight, vector in zip(weights, vectors):
        squared_norm = torch.linalg.vector_norm(vector.detach(), dim=(-2, -1), dtype=torch.float64).square()
        coef = torch.where(
            squared_norm > 0,
            weight / squared_norm.clamp_min(torch.finfo(torch.float64).tiny),
            torch.zeros_like(squared_norm),
        )
        coefs.append(coef.to(vector.dtype)[..., None, None])
    return coefs


def inner_objective(m: Tensor, vectors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``L(m) = Σ_i w_i ‖(m − u_i) u_iᵀ‖_F² / ‖u_i‖_F²`` per batch element (METHOD §2.6);
    zero vectors contribute 0 (dropped). Differentiable (for checks with autograd)."""
    coefs = objective_coefficients(vectors, weights)
    total = m.new_zeros(m.shape[:-2])
    for coef, vector in zip(coefs, vectors):
        total = total + coef[..., 0, 0] * ((m - vector) @ vector.mT).square().sum((-2, -1))
    return total


def inner_gradient(m: Tensor, vectors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``∇L(m) = 2 (m G − H)``, ``G = Σ_i w_i u_iᵀu_i/‖u_i‖²``,
    ``H = Σ_i w_i u_i u_iᵀu_i/‖u_i‖²`` (METHOD §2.6; derivation: ``∂‖(m−u)uᵀ‖²/∂m =
    2 (m−u) uᵀu``). The Adam loop evaluates the same gradient as
    ``g_0 + 2 (m − m_0) G`` (see :func:`adam_displacement`)."""
    coefs = objective_coefficients(vectors, weights)
    d_in = m.shape[-1]
    gram = m.new_zeros(*m.shape[:-2], d_in, d_in)
    weighted_products = torch.zeros_like(m)
    for coef, vector in zip(coefs, vectors):
        weighted_gram = coef * (vector.mT @ vector)
        gram = gram + weighted_gram
        weighted_products = weighted_products + vector @ weighted_gram
    return 2.0 * (m @ gram - weighted_products)
