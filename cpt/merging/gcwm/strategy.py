"""GCWM as a registered integration strategy (``gcwm``) on the streamed merge pipeline."""

from __future__ import annotations

import torch

from ...geometry import right_basis
from ...strategies import register_strategy
from ..pipeline import MergeResult, MergeStrategy, TensorBatch
from .continual import gcwm_continual_step, gcwm_non_target_step, step_coefficient
from .params import GCWMParams

__all__ = ["GCWM"]


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
