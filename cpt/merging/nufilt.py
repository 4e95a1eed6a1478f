"""NUFILT — null-space filtering with a small LoRA correction (METHOD §3).

``θ_1 = E_1``. For t ≥ 2, per target tensor, with ``Δ = θ_{t−1} − θ0`` and ``τ = τ_t``
(``W ∈ R^{d_out×d_in}``)::

    V̂   = top-r_p right singular vectors of Δ          P = I − V̂ V̂ᵀ
    V̂_t = top-r_v right singular vectors of τ
    M   = Δ + τ P
    T   = [Δ V̂ , τ V̂_t]        V = [V̂ , V̂_t]             (column-wise)
    A = 0 ∈ R^{r_l×d_in},  B ~ N(0, σ²) ∈ R^{d_in×r_l}
    (A, B) ← Adam(lr, iters) on ‖T − (M + τ B A) V‖_F²
    θ_t = θ_{t−1} + τ (P + B A)

``P`` removes from the new task vector the input directions the state already uses
(``τ P V̂ = 0``); the adapter ``BA`` then adds back what keeps both the old behaviour on
``V̂`` and the new task's behaviour on ``V̂_t``.

Choices where METHOD is silent (all documented parameters):

* **Ranks are capped** by what the tensor has: ``r_p, r_v ≤ min(d_out, d_in)`` (the
  number of right singular vectors) and ``r_l ≤ d_in``. Singular vectors whose singular
  value is numerically zero (``s ≤ max(d_out, d_in)·eps_f32·s_max``, the usual
  ``matrix_rank`` tolerance) are dropped from ``V̂`` and ``V̂_t``: they are an arbitrary
  basis of a null space, not directions of the update (this matters for LoRA-trained,
  exactly low-rank deltas). On a tiny model (``d_in = 64 < r_p``) a full-rank ``Δ`` gives
  ``P = 0``: only the adapter moves the tensor — the method, not a bug.
* **σ** (``init_std``): ``1/√d_in`` by default, so each column of ``B`` has about unit
  norm and ``τ B`` is on the scale of ``τ``'s rows. ``B`` is drawn per tensor on the CPU
  from a generator seeded with ``(seed, step, crc32(name))``: results do not depend on
  batching or device.
* **Adam** is ``torch.optim.Adam`` (betas 0.9/0.999, eps 1e-8, no weight decay) on the
  sum of the per-tensor objectives of a batch — Adam is element-wise, so every tensor is
  optimised exactly as on its own. Float32.
* **Non-target tensors** (embeddings, norms, biases, lm_head): task arithmetic
  ``θ_t = θ_{t−1} + non_target_scaling · τ_t``, default 1 — the unfiltered form of the
  target rule (``P = I``, ``BA = 0``), so nothing is rescaled differently from the
  target tensors. At t = 1 every tensor is ``E_1``.

Stats per tensor: ``norm_update``, ``norm_filtered`` (‖τP‖), ``norm_adapter`` (‖τBA‖),
``objective_before`` / ``objective_after`` (the objective at A = 0 and after Adam), and
the effective ranks.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from cpt.merging.contract import MergeResult, MergeStrategy, TensorBatch
from cpt.strategies import register_strategy


@dataclass
class NufiltParams:
    projection_rank: Annotated[int, Field(ge=0)] = 128
    """r_p: right singular vectors of θ_{t−1} − θ0 filtered out of τ_t (128; capped per tensor)."""
    lora_rank: Annotated[int, Field(ge=0)] = 64
    """r_l: rank of the correction B A (64; capped at d_in)."""
    task_rank: Annotated[int, Field(ge=0)] = 8
    """r_v: right singular vectors of τ_t whose outputs the objective preserves (8; capped per tensor)."""
    lr: Annotated[float, Field(ge=0)] = 1e-3
    """Adam learning rate of the correction (1e-3)."""
    iters: Annotated[int, Field(ge=0)] = 50
    """Adam steps (50); 0 keeps A = 0, i.e. the pure filter θ_t = θ_{t−1} + τ_t P."""
    init_std: Annotated[float, Field(gt=0)] | None = None
    """σ of B's Gaussian init; None = 1/√d_in per tensor."""
    seed: int = 0
    """Seed of B's init (combined with the step and the tensor name)."""
    non_target_scaling: float = 1.0
    """λ of task arithmetic on non-target tensors at t ≥ 2: θ_t = θ_{t−1} + λ τ_t (1.0)."""


def top_right_vectors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``rank`` right singular vectors ``[n, d_in, r]`` of ``[n, d_out, d_in]``,
    with columns of numerically zero singular values set to 0, and the count kept ``[n]``."""
    rank = min(rank, *matrix.shape[-2:])
    if rank == 0:
        return matrix.new_zeros(matrix.shape[0], matrix.shape[-1], 0), torch.zeros(matrix.shape[0], dtype=torch.long)
    _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    tol = max(matrix.shape[-2:]) * torch.finfo(torch.float32).eps * s[:, :1]
    keep = (s[:, :rank] > tol) & (s[:, :rank] > 0)
    vectors = vh[:, :rank].mT * keep[:, None, :].to(matrix.dtype)
    return vectors, keep.sum(dim=1)


def _init_b(names: list[str], step: int, d_in: int, rank: int, std: float | None, seed: int) -> torch.Tensor:
    sigma = std if std is not None else d_in**-0.5
    blocks = []
    for name in names:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + zlib.crc32(name.encode())) % 2**63)
        blocks.append(sigma * torch.randn(d_in, rank, generator=generator))
    return torch.stack(blocks)


def nufilt_merge(
    previous: torch.Tensor,
    task_vector: torch.Tensor,
    b_init: torch.Tensor,
    *,
    projection_rank: int,
    task_rank: int,
    lr: float,
    iters: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """METHOD §3 NUFILT for ``[n, d_out, d_in]`` (``previous`` = θ_{t−1} − θ0, ``τ_t``).

    ``b_init`` is B's init ``[n, d_in, r_l]``. Returns the update ``τ (P + B A)`` and
    per-tensor diagnostics.
    """
    v_hat, kept_p = top_right_vectors(previous, projection_rank)
    v_task, kept_v = top_right_vectors(task_vector, task_rank)
    filtered = task_vector - (task_vector @ v_hat) @ v_hat.mT  # τ P
    basis = torch.cat([v_hat, v_task], dim=-1)  # V
    target = torch.cat([previous @ v_hat, task_vector @ v_task], dim=-1)  # T
    residual = target - (previous + filtered) @ basis  # T − M V
    before = residual.square().flatten(1).sum(1)
    n, d_in, r_l = b_init.shape
    b = b_init.to(task_vector).clone().requires_grad_(True)
    a = torch.zeros(n, r_l, d_in, dtype=task_vector.dtype, device=task_vector.device, requires_grad=True)
    if iters > 0 and r_l > 0:
        optimizer = torch.optim.Adam([a, b], lr=lr)
        with torch.enable_grad():
            for _ in range(iters):
                optimizer.zero_grad(set_to_none=True)
                loss = (residual - (task_vector @ b) @ (a @ basis)).square().sum()
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        adapter = (task_vector @ b) @ a  # τ B A
        after = (residual - adapter @ basis).square().flatten(1).sum(1)
        update = filtered + adapter
    diagnostics = {
        "objective_before": before,
        "objective_after": after,
        "norm_filtered": filtered.flatten(1).norm(dim=1),
        "norm_adapter": adapter.flatten(1).norm(dim=1),
        "projection_rank": kept_p,
        "task_rank": kept_v,
    }
    return update.detach(), diagnostics


@register_strategy(
    "nufilt",
    params=NufiltParams,
    train_from="base",
    description="null-space filtering of τ_t against the state's top input directions plus a small LoRA correction (METHOD §3)",
)
class Nufilt(MergeStrategy):
    def rows_separable(self, target):
        return not target  # non-target rule is element-wise; targets need whole matrices

    def merge(self, batch: TensorBatch) -> MergeResult:
        p = self.params
        n = len(batch.names)
        extra: list[dict] = [{} for _ in range(n)]
        if batch.step == 1:
            new_state = batch.base + batch.task_vector
        elif batch.target:
            d_in = batch.task_vector.shape[-1]
            r_l = min(p.lora_rank, d_in)
            b_init = _init_b(batch.names, batch.step, d_in, r_l, p.init_std, p.seed)
            update, diag = nufilt_merge(
                batch.state_delta,
                batch.task_vector,
                b_init,
                projection_rank=p.projection_rank,
                task_rank=p.task_rank,
                lr=p.lr,
                iters=p.iters,
            )
            new_state = batch.state + update
            for i in range(n):
                extra[i] = {
                    key: (int(value[i]) if value.dtype == torch.long else float(value[i]))
                    for key, value in diag.items()
                }
                extra[i]["lora_rank"] = r_l
        else:
            new_state = batch.state + p.non_target_scaling * batch.task_vector
        norms = (new_state - batch.state).flatten(1).norm(dim=1)
        return MergeResult(state=new_state, stats=[{"norm_update": float(norms[i]), **extra[i]} for i in range(n)])
