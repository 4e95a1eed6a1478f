"""GCWM as a registered integration strategy (``gcwm``) on the streamed merge pipeline."""

from __future__ import annotations

import math
from typing import Any

import torch

from ...geometry import right_basis
from ...strategies import register_strategy
from ..contract import ordered_union
from ..merge_diagnostics import aggregate_by_family
from ..pipeline import MergeResult, MergeStrategy, TensorBatch
from .continual import gcwm_continual_step, gcwm_non_target_step, norm_step_coefficient, step_coefficient
from .params import GCWMParams

__all__ = ["GCWM"]


_STAT_KEYS = ("conflict", "alpha", "union_rank", "branch", "norm_merged", "bary_iters")
#: METHOD §2.10 per-tensor diagnostics of gcwm_merge (absent from a row where undefined).
_DIAGNOSTIC_KEYS = ("dev_sum", "dev_sum_plain", "dev_sum_relation", "displacement_plain", "displacement_relation")


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
    Target tensors: θ_t = θ_{t−1} + c_t (m_t − m_{t−1}) (numeric ``step_coef``), or
    θ_t = θ0 + c_t m_t with c_t = n̄_t / ‖m_t‖ (``step_coef: norm``, METHOD §2.9: the targets
    are written as θ0 + m_t and the pipeline rescales θ_t − θ0 by c_t once every tensor is
    merged, :meth:`finalize_scale`); non-target tensors follow ``non_target`` (``base``
    keeps θ0, as the reference does).

    Carried scalars (``history/step-<t>/scalars.json``): ``task_vector_norms`` — the
    whole-model ‖τ_1‖ … ‖τ_t‖ over the target tensors; ``task_vector_norm_sums`` — per
    target tensor Σ_s ‖τ_s‖ (for the per-tensor effective scale); ``step_coef`` — c_t.

    The step's summary (the integration JSON's ``summary``) holds ``step_coef`` (c_t),
    ``mean_task_norm`` (n̄_t), ``norm_merged`` (‖m_t‖), ``norm_state_delta`` (‖θ_t − θ0‖),
    ``effective_scale`` (‖θ_t − θ0‖ / n̄_t, METHOD §2.10), ``effective_scale_per_tensor``
    ({name: ‖θ_t − θ0‖_i / mean_s ‖τ_s‖_i}) and ``diagnostics``: per METHOD §2.10 quantity
    its mean over the target tensors and per family (attention, MLP).

    Multi-process runs (the gather contract of :class:`~cpt.merging.contract.MergeStrategy`):
    the inner solve, m_t and the kept tensors are per tensor, so each rank merges its share
    and writes its own shards of ``merged`` and ``tau_<k>`` (joined into one index per key:
    step t+1 reads them as one process's, whatever the number of ranks). The whole-model
    quantities — ‖τ_t‖², ‖m_t‖², the per-tensor norms and METHOD §2.10 diagnostics — are
    accumulated by :meth:`merge` and gathered after the batches (:meth:`rank_partials`), so
    every rank finds the same c_t (and under ``step_coef: norm`` rescales its own tensors).
    Only the order of the float64 sums differs from one process.
    """

    rank_split = True
    #: A :class:`~cpt.merging.gcwm.cache.GCWMMergeCache` the merges are read from and stored in
    #: (``cpt study`` sets one for variants that share their ``m_t``); None: every merge computed.
    merge_cache = None

    def begin_step(self, step: int, batches, scalars: dict[str, Any]) -> None:
        """Reset the step's whole-model accumulators (no pre-pass over the tensors)."""
        norms = list(scalars.get("task_vector_norms", [])) if step > 1 else []
        self._norms_complete = len(norms) == step - 1
        if self.params.step_coef == "norm" and not self._norms_complete:
            raise ValueError(
                f"GCWM step {step} with step_coef 'norm': the norms of τ_1..τ_{step - 1} are missing from the "
                "run's history/ scalars (earlier steps ran without them): rerun the sequence with --overwrite"
            )
        self._earlier_norms = norms
        self._earlier_norm_sums = dict(scalars.get("task_vector_norm_sums", {})) if step > 1 else {}
        self._task_sq = 0.0
        self._merged_sq = 0.0
        self._state_delta_sq: dict[str, float] = {}  # per target tensor; unscaled ‖m_t‖² under 'norm'
        self._task_norms: dict[str, float] = {}
        self._diagnostics: dict[str, dict[str, float]] = {key: {} for key in _DIAGNOSTIC_KEYS}
        self._scale: float | None = None

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
        residual = (task_vector - left @ basis.mT).flatten(1).norm(dim=1)
        error = residual / task_vector.flatten(1).norm(dim=1).clamp_min(1e-30)
        return {"left": left, "right": basis}, error

    def plain_sum_weights(self, step: int) -> None:
        return None  # GCWM records METHOD §2.10 itself, per branch and against its own active set

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
            raise ValueError(
                f"GCWM step {step}: no kept merged delta m_(t-1) for {batch.names[0]}; "
                "the run's history/ folder is missing or incomplete: rerun with --overwrite"
            )
        earlier = [self._kept_tau(batch, k) for k in self._window(step)]
        if any(tau is None for tau in earlier):
            raise ValueError(f"GCWM step {step}: a kept task vector is missing for {batch.names[0]}")
        norm_mode = self.params.step_coef == "norm"
        merged, increment, stats = gcwm_continual_step(
            step,
            batch.task_vector,
            previous,
            earlier or None,
            self.params,
            coefficient=1.0 if norm_mode else None,
            diagnostics=True,
            merge_fn=self.merge_cache,
        )
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
        if norm_mode:  # θ_t = θ0 + c_t m_t, c_t applied by finalize_scale
            new_state = batch.base + merged.to(batch.base.dtype)
        else:
            new_state = batch.state + increment.to(batch.state.dtype)
        update_norms = (new_state - batch.state).flatten(1).norm(dim=1)
        state_delta_sq = (new_state.double() - batch.base.double()).flatten(1).square().sum(1)
        task_norms = torch.linalg.vector_norm(batch.task_vector.flatten(1), dim=1, dtype=torch.float64)
        merged_sq = torch.linalg.vector_norm(merged.flatten(1), dim=1, dtype=torch.float64).square()
        self._task_sq += float(task_norms.square().sum())
        self._merged_sq += float(merged_sq.sum())
        per_tensor = []
        for i, name in enumerate(batch.names):
            row = {key: float(stats[key][i]) for key in _STAT_KEYS if key in stats}
            row["branch"] = ("plain", "relation", "both")[int(stats["branch"][i])]
            row.update(norm_task_vector=float(task_norms[i]))
            if not norm_mode:  # under 'norm' the update and c_t are known only after every tensor
                row.update(norm_update=float(update_norms[i]), step_coef=float(stats["step_coef"]))
            for key in _DIAGNOSTIC_KEYS:
                value = float(stats[key][i])
                if math.isfinite(value):
                    row[key] = value
                    self._diagnostics[key][name] = value
            if history_error is not None:
                row["history_error"] = float(history_error[i])
            self._state_delta_sq[name] = float(state_delta_sq[i])
            self._task_norms[name] = float(task_norms[i])
            per_tensor.append(row)
        return MergeResult(state=new_state, history=keep, stats=per_tensor)

    def rank_partials(self) -> dict[str, Any]:
        return {
            "task_sq": self._task_sq,
            "merged_sq": self._merged_sq,
            "state_delta_sq": self._state_delta_sq,
            "task_norms": self._task_norms,
            "diagnostics": self._diagnostics,
        }

    def absorb_rank_partials(self, partials: list[dict[str, Any]], order: list[str]) -> None:
        self._task_sq = sum(part["task_sq"] for part in partials)
        self._merged_sq = sum(part["merged_sq"] for part in partials)
        self._state_delta_sq = ordered_union([part["state_delta_sq"] for part in partials], order)
        self._task_norms = ordered_union([part["task_norms"] for part in partials], order)
        self._diagnostics = {
            key: ordered_union([part["diagnostics"][key] for part in partials], order) for key in _DIAGNOSTIC_KEYS
        }

    def end_step(self, step: int, scalars: dict) -> dict:
        """c_t (and, under ``step_coef: norm``, the rescale), n̄_t, ‖m_t‖ and what the merge did
        (METHOD §2.9, §2.10); carries the task-vector norms to step t+1."""
        norms = [*self._earlier_norms, math.sqrt(self._task_sq)]
        merged_norm = math.sqrt(self._merged_sq)
        if self.params.step_coef == "norm":
            coefficient, mean_norm = norm_step_coefficient(norms, merged_norm)
            state_scale = coefficient  # θ_t − θ0 = c_t m_t
            # c_1 = ‖τ_1‖/‖m_1‖ with m_1 = τ_1 is 1 up to the norms' summation order: a factor within
            # 1e-9 of 1 changes no float32 weight, so the model-sized rescale pass is skipped.
            self._scale = None if abs(coefficient - 1.0) <= 1e-9 else coefficient
        else:
            coefficient, mean_norm = step_coefficient(step, self.params), sum(norms) / len(norms)
            state_scale = 1.0  # the written state is θ_t already
        count = len(norms)
        sums = {name: self._earlier_norm_sums.get(name, 0.0) + norm for name, norm in self._task_norms.items()}
        state_norms = {name: state_scale * math.sqrt(sq) for name, sq in self._state_delta_sq.items()}
        per_tensor_scale = {
            name: (state_norms[name] / (sums[name] / count) if sums[name] > 0 else math.nan) for name in state_norms
        }
        state_delta_norm = math.sqrt(sum(norm * norm for norm in state_norms.values()))
        scalars.update(task_vector_norms=norms, task_vector_norm_sums=sums, step_coef=coefficient)
        summary = {
            "step_coef": coefficient,
            "step_coef_mode": "norm" if self.params.step_coef == "norm" else "constant",
            "memory": self.params.memory,
            "mean_task_norm": mean_norm,
            "norm_merged": merged_norm,
            "norm_state_delta": state_delta_norm,
            "effective_scale": state_delta_norm / mean_norm if mean_norm > 0 else None,
            "effective_scale_per_tensor": {
                name: value for name, value in per_tensor_scale.items() if math.isfinite(value)
            },
            "diagnostics": {
                **{key: aggregate_by_family(values) for key, values in self._diagnostics.items() if values},
                "effective_scale": aggregate_by_family(per_tensor_scale),
            },
        }
        if not self._norms_complete:
            summary["warning"] = (
                f"norms of τ_1..τ_{step - 1} missing from the carried scalars: n̄_t and the "
                "effective scales use the available ones"
            )
        return summary

    def finalize_scale(self, step: int, scalars: dict) -> float | None:
        """``step_coef: norm``: θ_t = θ0 + c_t m_t (the targets were written as θ0 + m_t)."""
        return self._scale
