"""What a merge did (METHOD §2.10): diagnostics every strategy can record, tensor-in, tensor-out.

With ``s = Σ_i w_i v_i`` the plain sum of a step's active set:

- :func:`dev_sum` — ``‖m − s‖ / ‖s‖`` per tensor: how far the merge moved from plain
  addition (0 for task arithmetic);
- :func:`relative_change` — ``‖x − y‖ / ‖y‖``, the shared rule (also the inner solve's
  displacement ``‖m − m_0‖ / ‖m_0‖``);
- :func:`effective_scale` — ``‖θ_t − θ0‖ / n̄_t``, the size of the state's delta in units of
  a mean task vector (whole model over the target tensors, or per tensor);
- :func:`aggregate_by_family` — per-step mean over tensors, and per family (attention, MLP).

No files, no model objects: callers pass tensors (batched over leading dimensions, norms
over the last two) and floats. Undefined values (a zero reference) are NaN, and the
aggregates ignore them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from cpt.naming import tensor_family

__all__ = ["aggregate_by_family", "dev_sum", "effective_scale", "plain_sum", "relative_change", "relative_norm"]


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
