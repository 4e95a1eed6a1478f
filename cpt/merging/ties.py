"""TIES merging, continual form (METHOD §3).

An unscaled running merged vector ``M_t`` is kept as pipeline history (``M_1 = τ_1``);
each step merges it with the new task vector by TIES::

    M_t = TIES(M_{t−1}, τ_t),      θ_t = θ0 + λ M_t

where ``TIES(a, b)`` is, per tensor:

1. **trim** — keep each of ``a`` and ``b``'s top ``density`` fraction of entries by
   magnitude (``k = int(density · numel)`` entries *per tensor*; the batch-level
   original trims over the whole flattened model, which a streamed, per-tensor continual
   merge cannot do — every tensor keeps the same fraction instead);
2. **elect** — the per-entry sign of the sum of the trimmed vectors (``+`` where the sum
   is exactly 0): peft's ``majority_sign_method="total"``;
3. **disjoint mean** — the mean of the trimmed entries whose sign agrees with the
   elected one (0 where none does).

Trimming is the only part written here (batched over a ``[2, n, ...]`` stack: peft's
``magnitude_based_pruning`` works on one whole tensor at a time); the sign election and
the disjoint mean are ``peft.utils.merge_utils.calculate_majority_sign_mask`` and
``disjoint_merge``, whose semantics are exactly METHOD's. The whole step is cross-checked
against ``peft.utils.merge_utils.ties`` (weights 1) in the tests.

Applied to every tensor (target or not), as the original TIES does. If the kept ``M``
of a tensor is missing at t ≥ 2 (history lost), it is recovered from the state,
``M_{t−1} = (θ_{t−1} − θ0)/λ``, and the tensor's stats say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge
from pydantic import Field

from cpt.merging.pipeline import RunningMergeStrategy
from cpt.strategies import register_strategy


@dataclass
class TiesParams:
    density: Annotated[float, Field(gt=0, le=1)] = 0.2
    """k: the fraction of each vector's entries kept (largest magnitudes), per tensor (0.2)."""
    scaling: float = 0.3
    """λ in θ_t = θ0 + λ M_t (0.3)."""
    majority_sign: Literal["total", "frequency"] = "total"
    """Sign election: ``total`` = sign of the sum (METHOD, TIES); ``frequency`` = sign of
    the majority count (peft's alternative, for ablation)."""


def trim_top_k(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``int(density·numel)`` magnitudes of each tensor ``stacked[i, j]``.

    ``stacked`` is ``[v, n, ...]`` (v vectors of n tensors); the same rule as peft's
    ``magnitude_based_pruning`` applied to every ``[...]`` tensor on its own.
    """
    if density >= 1:
        return stacked
    flat = stacked.reshape(stacked.shape[0], stacked.shape[1], -1)
    k = int(density * flat.shape[-1])
    if k <= 0:
        return torch.zeros_like(stacked)
    index = flat.abs().topk(k, dim=-1, largest=True).indices
    mask = torch.zeros_like(flat).scatter_(-1, index, 1.0)
    return (flat * mask).reshape(stacked.shape)


def ties_merge(previous: torch.Tensor, task_vector: torch.Tensor, density: float,
               majority_sign: str = "total") -> tuple[torch.Tensor, torch.Tensor]:
    """``TIES(M_{t−1}, τ_t)`` batched over ``[n, ...]`` (METHOD §3).

    Returns the merged vector and, per tensor, the fraction of entries where both trimmed
    vectors are non-zero with opposite signs (the sign conflicts TIES resolves).
    """
    trimmed = trim_top_k(torch.stack([previous, task_vector]), density)
    agree = calculate_majority_sign_mask(trimmed, method=majority_sign)
    merged = disjoint_merge(trimmed, agree)
    conflict = (trimmed[0] * trimmed[1] < 0).flatten(1).float().mean(dim=1)
    return merged, conflict


@register_strategy("ties", params=TiesParams, train_from="base",
                   description="continual TIES: M_t = TIES(M_{t-1}, τ_t) (trim, elect sign, disjoint mean), θ_t = θ0 + λ·M_t (METHOD §3)")
class Ties(RunningMergeStrategy):
    def first_stats(self, task_vector):
        nonzero = (task_vector != 0).flatten(1).float().mean(dim=1)
        return {"merged_density": nonzero, "sign_conflicts": torch.zeros(task_vector.shape[0])}

    def combine(self, previous, task_vector):
        merged, conflict = ties_merge(previous, task_vector, self.params.density, self.params.majority_sign)
        return merged, {"merged_density": (merged != 0).flatten(1).float().mean(dim=1), "sign_conflicts": conflict}
