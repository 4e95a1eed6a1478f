"""OPCM — orthogonal projection continual merging (METHOD §3).

``θ_1 = E_1`` (``λ_1 = 1``). For t ≥ 2, with ``P = θ_{t−1} − θ0``:

* target tensors (the 2-D linear weights selected by the recipe's ``targets``):
  ``P = U S Vᵀ``; ``k`` = first (0-based) index with ``cumsum(s)/sum(s) > α``;
  ``X = Uᵀ τ_t V`` with its diagonal and leading ``k×k`` block zeroed; ``τ̃ = U X Vᵀ``;
  ``D_t = λ_{t−1} P + τ̃``;
* every other tensor: ``D_t = λ_{t−1} P + τ_t``;
* with ``n̄`` the mean whole-model norm of ``τ_1 … τ_t``:
  ``θ_t = θ0 + D_t · n̄/‖D_t‖`` and ``λ_t = ‖D_t‖/n̄``, ‖·‖ over the whole model.

Since ``θ_{t−1} − θ0 = D_{t−1}/λ_{t−1}``, ``λ_{t−1} P = D_{t−1}``: D accumulates the
projected task vectors while the stored delta keeps the average task-vector norm.

Implementation notes:

* The reference uses a full SVD (``full_matrices=True``): ``X`` is ``d_out × d_in``. The
  entries it zeroes (the diagonal and the leading ``k×k`` block) all lie in the leading
  ``r×r`` block, ``r = min(d_out, d_in)``, so ``τ̃ = τ − U_r Z V_rᵀ`` with ``Z`` the zeroed
  part of the thin ``X_r = U_rᵀ τ V_r`` — the same result from the thin SVD
  (``full_matrices=False``), batched over equal-shape tensors; the tests check it
  against the full-SVD formula on non-square matrices.
* Where ``P = 0`` (a tensor the earlier tasks never changed), there is nothing to
  protect and its singular vectors are arbitrary: ``τ̃ = τ`` (the reference would zero
  the diagonal of ``τ`` in an arbitrary basis), ``k`` is reported as 0.
* ‖τ_t‖ is computed in a ``begin_step`` pre-pass over all tensors; the per-task norms,
  ``n̄`` and ``λ_t`` are carried as scalars. ``merge`` returns the unscaled ``θ0 + D_t``
  and accumulates ``‖D_t‖²``; the pipeline then applies ``finalize_scale``'s
  ``s = n̄/‖D_t‖`` as ``θ_t = θ0 + s·(θ_t − θ0)`` (no rescale at t = 1, where s = 1).
* Multi-process runs (the gather contract of :class:`~cpt.merging.contract.MergeStrategy`):
  ‖τ_t‖² is summed per rank over its share in the pre-pass and the ranks' sums added;
  ‖D_t‖² and the per-tensor pieces of the update norms are gathered after the merge, so
  every rank finds the same λ_t and s, and each rescales the tensors it wrote. The
  projection is per tensor. Only the order of the float64 sums differs from one process.
* Stats: per tensor ``split_rank`` (target tensors, t ≥ 2), the norms of ``τ_t``, ``τ̃``,
  the unscaled ``D_t`` and ``P``; the summary holds ``lambda``, ``mean_task_norm``, the
  global ``scale`` and the true per-tensor update norms ``‖θ_t − θ_{t−1}‖`` (known only
  after the rescale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from cpt.merging.contract import MergeResult, MergeStrategy, TensorBatch, gather_shares, ordered_union
from cpt.strategies import register_strategy


@dataclass
class OPCMParams:
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    """α: the split rank k is the first index where the cumulative singular-value share
    of the previous delta exceeds α; the leading k×k block of the new task vector (in
    the previous delta's singular bases) is removed, as is its diagonal (0.5)."""


def opcm_project(previous: torch.Tensor, task_vector: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """METHOD §3 OPCM projection, batched over ``[n, d_out, d_in]``: ``(τ̃, k)``.

    ``previous`` is ``P = θ_{t−1} − θ0``, ``task_vector`` is ``τ_t``; ``k`` is ``[n]``.
    """
    u, s, vh = torch.linalg.svd(previous, full_matrices=False)
    total = s.sum(dim=-1, keepdim=True)
    nonzero = total.squeeze(-1) > 0
    share = s.cumsum(dim=-1) / torch.where(total > 0, total, torch.ones_like(total))
    k = (share > alpha).float().argmax(dim=-1)
    k = torch.where(nonzero, k, torch.zeros_like(k))
    r = s.shape[-1]
    x = u.mT @ task_vector @ vh.mT
    idx = torch.arange(r, device=previous.device)
    diagonal = idx[:, None] == idx[None, :]
    block = (idx[None, :, None] < k[:, None, None]) & (idx[None, None, :] < k[:, None, None])
    removed = (diagonal[None] | block) & nonzero[:, None, None]
    projected = task_vector - u @ (x * removed) @ vh
    return projected, k


@register_strategy(
    "opcm",
    params=OPCMParams,
    train_from="base",
    description="orthogonal projection continual merging with norm-preserving rescale (METHOD §3)",
)
class OPCM(MergeStrategy):
    rank_split = True

    def begin_step(self, step, batches, scalars):
        def task_sq() -> float:  # ‖τ_t‖² over this rank's share
            total = 0.0
            for _target, _names, _rows, _base, _state, _expert, task_vector in batches.iterate():
                total += float(task_vector.double().square().sum())
            return total

        self._task_sq = sum(gather_shares(batches, task_sq))
        norms = list(scalars.get("task_norms", []))
        self._carried = step == 1 or (len(norms) == step - 1 and "lambda" in scalars)
        self._previous_lambda = float(scalars.get("lambda", 1.0)) if step > 1 else 1.0
        self._delta_sq = 0.0
        self._pieces: dict[str, tuple[float, float, float]] = {}
        self._scale = None

    def rows_separable(self, target):
        return not target  # D_t = λP + τ_t entry by entry; targets need their SVD

    def merge(self, batch: TensorBatch) -> MergeResult:
        previous, task_vector = batch.state_delta, batch.task_vector
        split = None
        if batch.step == 1:
            delta, projected = task_vector, task_vector
        elif batch.target:
            projected, split = opcm_project(previous, task_vector, self.params.alpha)
            delta = self._previous_lambda * previous + projected
        else:
            projected = task_vector
            delta = self._previous_lambda * previous + task_vector
        flat_d, flat_p = delta.flatten(1).double(), previous.flatten(1).double()
        dd, dp, pp = flat_d.square().sum(1), (flat_d * flat_p).sum(1), flat_p.square().sum(1)
        self._delta_sq += float(dd.sum())
        task_norm, projected_norm = task_vector.flatten(1).norm(dim=1), projected.flatten(1).norm(dim=1)
        stats = []
        for i, name in enumerate(batch.names):
            # += : a non-target tensor may arrive in row blocks (rows_separable)
            old = self._pieces.get(name, (0.0, 0.0, 0.0))
            self._pieces[name] = (old[0] + float(dd[i]), old[1] + float(dp[i]), old[2] + float(pp[i]))
            entry = {
                "norm_task_vector": float(task_norm[i]),
                "norm_projected_task_vector": float(projected_norm[i]),
                "norm_delta_unscaled": math.sqrt(float(dd[i])),
                "norm_previous": math.sqrt(float(pp[i])),
            }
            if split is not None:
                entry["split_rank"] = int(split[i])
            stats.append(entry)
        return MergeResult(state=batch.base + delta, stats=stats)

    def rank_partials(self):
        return {"delta_sq": self._delta_sq, "pieces": self._pieces}

    def absorb_rank_partials(self, partials, order):
        self._delta_sq = sum(part["delta_sq"] for part in partials)
        self._pieces = ordered_union([part["pieces"] for part in partials], order)

    def end_step(self, step, scalars):
        norms = [*(scalars.get("task_norms", []) if self._carried else []), math.sqrt(self._task_sq)]
        mean_norm = sum(norms) / len(norms)
        delta_norm = math.sqrt(self._delta_sq)
        if step == 1 or delta_norm == 0 or mean_norm == 0:
            lam, self._scale = 1.0, None
        else:
            lam, self._scale = delta_norm / mean_norm, mean_norm / delta_norm
        scalars["task_norms"] = norms
        scalars["lambda"] = lam
        scalars["mean_task_norm"] = mean_norm
        s = 1.0 if self._scale is None else self._scale
        updates = {
            name: math.sqrt(max(s * s * dd - 2 * s * dp + pp, 0.0)) for name, (dd, dp, pp) in self._pieces.items()
        }
        summary = {
            "lambda": lam,
            "previous_lambda": self._previous_lambda,
            "mean_task_norm": mean_norm,
            "task_norm": norms[-1],
            "norm_delta_unscaled": delta_norm,
            "scale": s,
            "norm_update": updates,
        }
        if not self._carried:
            summary["warning"] = "OPCM scalars of step t-1 missing: λ_{t-1} = 1 and n̄ from this task only"
        return summary

    def finalize_scale(self, step, scalars):
        return self._scale
