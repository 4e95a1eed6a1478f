"""WUDI merging, continual form (METHOD §3).

Per target tensor, METHOD §2.6's early-stopped Adam on
``L(m) = Σ_i w_i ‖(m − u_i) u_iᵀ‖_F² / ‖u_i‖_F²`` over the active set
``{θ_{t−1} − θ0, τ_t}`` (weights 1, lr 1e-5, 50 steps, from ``m = Σ u_i``)::

    θ_t = θ0 + m

The solve is GCWM's plain branch, :func:`cpt.merging.gcwm.adam_merge` (batched over
equal-shape tensors), not a copy of it.

* **t = 1** (and any tensor the earlier tasks never changed): ``θ_{t−1} − θ0 = 0``, whose
  term is ``0/0``; it is dropped from the objective (``adam_merge``'s rule for zero
  vectors). With ``τ_1`` alone, ``m_0 = τ_1`` is already the minimiser (zero gradient),
  so ``θ_1 = E_1`` on target tensors.
* **Non-target tensors** (embeddings, norms, biases, lm_head), ``non_target``:

  - ``average`` (default): the mean of the active set,
    ``θ_t = θ0 + ((θ_{t−1} − θ0) + τ_t)/2`` for t ≥ 2 and ``θ_1 = E_1`` (at t = 1 the
    active set is ``τ_1`` alone, as for the target tensors). The WUDI reference averages
    the task vectors of every tensor it does not optimise (FusionBench
    ``fusion_bench/method/wudi/wudi.py``, ``new_vector[key] / num_tvs``);
  - ``sum``: task arithmetic ``θ_t = θ_{t−1} + non_target_scaling · τ_t`` — with the
    default λ = 1 the plain sum of the task vectors (the optimised tensors' ``m_0``);
    0.3 gives METHOD's task-arithmetic default.

Stats per tensor: ``norm_update``; on target tensors also ``norm_merged`` (‖m‖), the
Adam displacement ``‖m − m_0‖``, the objective at ``m_0`` and at ``m``, and the number of
active vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field

from cpt.merging.contract import MergeResult, MergeStrategy, TensorBatch
from cpt.merging.inner_solver import adam_merge
from cpt.strategies import register_strategy


@dataclass
class WudiParams:
    lr: Annotated[float, Field(ge=0)] = 1e-5
    """Adam learning rate of the inner solve (1e-5)."""
    iters: Annotated[int, Field(ge=0)] = 50
    """Adam steps (50): the early stop is part of the method."""
    non_target: Literal["average", "sum"] = "average"
    """Non-target tensors: ``average`` = θ0 + (θ_{t−1} − θ0 + τ_t)/2, the reference's mean of the
    active set; ``sum`` = θ_{t−1} + non_target_scaling·τ_t."""
    non_target_scaling: float = 1.0
    """λ of ``non_target: sum``: θ_t = θ_{t−1} + λ τ_t (1.0, the plain sum)."""


def wudi_objective(merged: torch.Tensor, vectors: list[torch.Tensor]) -> torch.Tensor:
    """``L(m) = Σ_i ‖(m − u_i) u_iᵀ‖² / ‖u_i‖²`` per tensor ``[n]`` (zero vectors dropped)."""
    total = torch.zeros(merged.shape[0], dtype=torch.float64, device=merged.device)
    for u in vectors:
        sq = u.double().flatten(1).square().sum(1)
        diff = (merged - u).double()
        term = ((diff @ (u.double().mT @ u.double())) * diff).flatten(1).sum(1)
        total += torch.where(sq > 0, term / sq.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(sq))
    return total


@register_strategy(
    "wudi",
    params=WudiParams,
    train_from="base",
    description="WUDI: early-stopped Adam on the interference objective over {θ_{t-1}−θ0, τ_t}, θ_t = θ0 + m (METHOD §3)",
)
class Wudi(MergeStrategy):
    def rows_separable(self, target):
        return not target  # non-target rule is element-wise; targets need whole matrices

    def merge(self, batch: TensorBatch) -> MergeResult:
        p = self.params
        n = len(batch.names)
        extra: list[dict] = [{} for _ in range(n)]
        if batch.target:
            vectors = [batch.state_delta, batch.task_vector]
            merged = adam_merge(vectors, [1.0, 1.0], lr=p.lr, iters=p.iters).to(torch.float32)
            new_state = batch.base + merged
            start = vectors[0] + vectors[1]
            before, after = wudi_objective(start, vectors), wudi_objective(merged, vectors)
            moved = (merged - start).flatten(1).norm(dim=1)
            merged_norm = merged.flatten(1).norm(dim=1)
            active = sum((v.flatten(1).abs().sum(1) > 0).long() for v in vectors)
            for i in range(n):
                extra[i] = {
                    "norm_merged": float(merged_norm[i]),
                    "norm_displacement": float(moved[i]),
                    "objective_before": float(before[i]),
                    "objective_after": float(after[i]),
                    "active_vectors": int(active[i]),
                }
        elif p.non_target == "sum":
            new_state = batch.state + p.non_target_scaling * batch.task_vector
        elif batch.step == 1:  # the active set is τ_1 alone
            new_state = batch.base + batch.task_vector
        else:
            new_state = batch.base + (batch.state_delta + batch.task_vector) / 2
        norms = (new_state - batch.state).flatten(1).norm(dim=1)
        return MergeResult(state=new_state, stats=[{"norm_update": float(norms[i]), **extra[i]} for i in range(n)])
