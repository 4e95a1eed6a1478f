"""What a merge did (METHOD §2.10): diagnostics every strategy can record, tensor-in, tensor-out.

With ``s = Σ_i w_i v_i`` the plain sum of a step's active set:

- :func:`dev_sum` — ``‖m − s‖ / ‖s‖`` per tensor: how far the merge moved from plain
  addition (0 for task arithmetic);
- :func:`relative_change` — ``‖x − y‖ / ‖y‖``, the shared rule (also the inner solve's
  displacement ``‖m − m_0‖ / ‖m_0‖``);
- :func:`effective_scale` — ``‖θ_t − θ0‖ / n̄_t``, the size of the state's delta in units of
  a mean task vector (whole model over the target tensors, or per tensor);
- :func:`aggregate_by_family` — per-step mean over tensors, and per family (attention, MLP);
- :class:`StepDiagnostics` — the same for any merge strategy, accumulated by the pipeline
  over a step's batches (what :func:`cpt.merging.batch_io.run_merge` records).

No files, no model objects: callers pass tensors (batched over leading dimensions, norms
over the last two) and floats. Undefined values (a zero reference) are NaN, and the
aggregates ignore them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from cpt.naming import tensor_family

__all__ = [
    "StepDiagnostics",
    "aggregate_by_family",
    "dev_sum",
    "effective_scale",
    "plain_sum",
    "relative_change",
    "relative_norm",
]


def _norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=(-2, -1), dtype=torch.float64)


def relative_norm(value: Tensor, reference: Tensor) -> Tensor:
    """``‖value‖_F / ‖reference‖_F`` over the last two dims (float64 ``[...]``); NaN where
    ``‖reference‖ = 0`` (the ratio is undefined there)."""
    num, den = _norm(value), _norm(reference)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), torch.full_like(num, math.nan))


def relative_change(value: Tensor, reference: Tensor) -> Tensor:
    """``‖value − reference‖_F / ‖reference‖_F`` over the last two dims (float64 ``[...]``).

    The difference is taken in the inputs' promoted precision (norms accumulate in
    float64), so it costs one operand of the batch's working precision, no float64 copy.
    NaN where ``‖reference‖ = 0``."""
    dtype = torch.promote_types(value.dtype, reference.dtype)
    return relative_norm(value.to(dtype) - reference.to(dtype), reference)


def plain_sum(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``s = Σ_i w_i v_i`` (METHOD §2.10) in the deltas' promoted precision."""
    if len(deltas) != len(weights) or not deltas:
        raise ValueError(f"need one weight per delta, got {len(deltas)} deltas and {len(weights)} weights")
    dtype = deltas[0].dtype
    for delta in deltas[1:]:
        dtype = torch.promote_types(dtype, delta.dtype)
    total = torch.zeros_like(deltas[0], dtype=dtype)
    for delta, weight in zip(deltas, weights):
        total.add_(delta.to(dtype), alpha=float(weight))
    return total


def dev_sum(merged: Tensor, deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``dev_sum = ‖m − s‖ / ‖s‖`` with ``s = Σ w_i v_i`` (METHOD §2.10), per tensor ``[...]``."""
    return relative_change(merged, plain_sum(deltas, weights))


def effective_scale(state_delta_norm: float | Tensor, task_vector_norms: Sequence[float] | Tensor) -> float | Tensor:
    """``‖θ_t − θ0‖ / n̄_t`` (METHOD §2.10), ``n̄_t`` the mean of ``‖τ_1‖ … ‖τ_t‖``.

    ``task_vector_norms``: the norms of τ_1..τ_t (a sequence, or a tensor whose last
    dimension runs over the steps, for per-tensor values). NaN when ``n̄_t = 0``."""
    if isinstance(task_vector_norms, Tensor):
        mean = task_vector_norms.to(torch.float64).mean(-1)
        ratio = torch.as_tensor(state_delta_norm, dtype=torch.float64) / mean
        return torch.where(mean > 0, ratio, torch.full_like(ratio, math.nan))
    norms = [float(norm) for norm in task_vector_norms]
    if not norms:
        raise ValueError("effective_scale needs the norms of τ_1..τ_t (got none)")
    mean = sum(norms) / len(norms)
    return float(state_delta_norm) / mean if mean > 0 else math.nan


def aggregate_by_family(values: Mapping[str, float]) -> dict[str, float]:
    """Mean of per-tensor values over all tensors and per family (``attention``, ``mlp``;
    ``other`` when present), NaN entries left out; a group with no finite value is omitted."""
    groups: dict[str, list[float]] = {"mean": []}
    for name, value in values.items():
        if value is None or not math.isfinite(float(value)):
            continue
        groups["mean"].append(float(value))
        groups.setdefault(tensor_family(name), []).append(float(value))
    return {key: sum(items) / len(items) for key, items in groups.items() if items}


class StepDiagnostics:
    """METHOD §2.10 for any merge strategy, accumulated over one step's target tensors.

    The pipeline (:func:`cpt.merging.batch_io.run_merge`) feeds every target batch to
    :meth:`observe` and calls :meth:`finish` once θ_t is complete. What is compared:

    - the merged delta ``m = θ_t − θ0`` of each target tensor;
    - the plain sum of the step's active deltas ``s = w_state (θ_{t−1} − θ0) + w_task τ_t`` —
      in continual form the active set of every merge rule is what it carries (the state's
      delta) and the new task vector; the weights come from
      :meth:`~cpt.merging.contract.MergeStrategy.plain_sum_weights` (``(1, λ)`` by default,
      so continual task arithmetic gives ``dev_sum = 0``, as METHOD states);
    - ``dev_sum = ‖m − s‖ / ‖s‖`` per tensor, and ``effective_scale = ‖θ_t − θ0‖ / n̄_t``
      (whole model over the targets, and per tensor), ``n̄_t`` the mean of the whole-model
      ``‖τ_1‖ … ‖τ_t‖`` carried across steps (:meth:`carried`).

    A tensor that arrives in row blocks is combined exactly (squared norms are summed
    per name before the ratios). ``dev_sum`` is taken before a global rescale
    (:meth:`~cpt.merging.contract.MergeStrategy.finalize_scale`): a rescale changes the size,
    not the shape, and shows in the effective scale, which uses the rescaled state.
    """

    #: The key of the pipeline's own carried scalars (``history/step-<t>/scalars.json``).
    CARRIED_KEY = "merge_diagnostics"

    def __init__(self, step: int, weights: tuple[float, float], carried: Mapping[str, Any] | None = None):
        carried = carried or {}
        self.step = step
        self.weights = (float(weights[0]), float(weights[1]))
        norms = [float(norm) for norm in carried.get("task_vector_norms", [])] if step > 1 else []
        self.complete = len(norms) == step - 1
        self._earlier_norms = norms
        self._earlier_sums = {str(k): float(v) for k, v in carried.get("task_vector_norm_sums", {}).items()}
        if step == 1:
            self._earlier_sums = {}
        self._deviation_sq: dict[str, float] = defaultdict(float)
        self._sum_sq: dict[str, float] = defaultdict(float)
        self._state_delta_sq: dict[str, float] = defaultdict(float)
        self._task_sq: dict[str, float] = defaultdict(float)

    def observe(
        self,
        names: Sequence[str],
        base: Tensor,
        state: Tensor,
        new_state: Tensor,
        task_vector: Tensor,
    ) -> None:
        """One target batch: θ0, θ_{t−1}, θ_t and τ_t ``[n, ...]`` (a row block of one tensor counts as a batch)."""
        merged = new_state - base
        plain = plain_sum([state - base, task_vector], list(self.weights))

        def squares(x: Tensor) -> list[float]:
            return torch.linalg.vector_norm(x.flatten(1), dim=1, dtype=torch.float64).square().tolist()

        for accumulator, values in (
            (self._deviation_sq, squares(merged - plain)),
            (self._sum_sq, squares(plain)),
            (self._state_delta_sq, squares(merged)),
            (self._task_sq, squares(task_vector)),
        ):
            for name, value in zip(names, values):
                accumulator[name] += value

    def accumulators(self) -> dict[str, dict[str, float]]:
        """The per-tensor sums observed so far (plain floats: sent between ranks)."""
        return {
            "deviation_sq": dict(self._deviation_sq),
            "sum_sq": dict(self._sum_sq),
            "state_delta_sq": dict(self._state_delta_sq),
            "task_sq": dict(self._task_sq),
        }

    def absorb(self, accumulators: Mapping[str, Mapping[str, float]]) -> None:
        """Add another process's :meth:`accumulators` (ranks merge disjoint tensors; sums are exact)."""
        for key, target in (
            ("deviation_sq", self._deviation_sq),
            ("sum_sq", self._sum_sq),
            ("state_delta_sq", self._state_delta_sq),
            ("task_sq", self._task_sq),
        ):
            for name, value in accumulators[key].items():
                target[name] += value

    def carried(self) -> dict[str, Any]:
        """What step t+1 needs: the whole-model ``‖τ_1‖ … ‖τ_t‖`` and per tensor ``Σ_s ‖τ_s‖``."""
        sums = dict(self._earlier_sums)
        for name, square in self._task_sq.items():
            sums[name] = sums.get(name, 0.0) + math.sqrt(square)
        return {"task_vector_norms": self._task_norms(), "task_vector_norm_sums": sums}

    def _task_norms(self) -> list[float]:
        return [*self._earlier_norms, math.sqrt(sum(self._task_sq.values()))]

    def finish(self, scale: float | None = None) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
        """(per-tensor rows ``{name: {dev_sum, effective_scale, norm_task_vector}}``, the step's
        summary) after the batches; ``scale``: the global rescale of θ_t − θ0, if any. The
        summary's keys are GCWM's (``mean_task_norm``, ``norm_state_delta``, ``effective_scale``,
        ``effective_scale_per_tensor``, ``diagnostics``: per quantity its mean and per family)."""
        factor = 1.0 if scale is None else abs(float(scale))
        norms = self._task_norms()
        mean_norm = sum(norms) / len(norms)
        count = len(norms)
        sums = self.carried()["task_vector_norm_sums"]
        rows: dict[str, dict[str, float]] = {}
        deviations: dict[str, float] = {}
        per_tensor_scale: dict[str, float] = {}
        for name in self._state_delta_sq:
            state_norm = factor * math.sqrt(self._state_delta_sq[name])
            mean_tensor = sums.get(name, 0.0) / count
            row = {"norm_task_vector": math.sqrt(self._task_sq[name])}
            if self._sum_sq[name] > 0:
                deviations[name] = row["dev_sum"] = math.sqrt(self._deviation_sq[name] / self._sum_sq[name])
            if mean_tensor > 0:
                per_tensor_scale[name] = row["effective_scale"] = state_norm / mean_tensor
            rows[name] = row
        state_delta_norm = factor * math.sqrt(sum(self._state_delta_sq.values()))
        summary: dict[str, Any] = {
            "mean_task_norm": mean_norm,
            "norm_state_delta": state_delta_norm,
            "effective_scale": state_delta_norm / mean_norm if mean_norm > 0 else None,
            "effective_scale_per_tensor": per_tensor_scale,
            "diagnostics": {
                **({"dev_sum": aggregate_by_family(deviations)} if deviations else {}),
                "effective_scale": aggregate_by_family(per_tensor_scale),
            },
        }
        if not self.complete:
            summary["warning"] = (
                f"norms of τ_1..τ_{self.step - 1} missing from the carried scalars (earlier steps ran "
                "without them): n̄_t and the effective scales use the available ones"
            )
        return rows, summary
