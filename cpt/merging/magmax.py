"""MagMax, continual form (METHOD §3).

An unscaled running vector ``M_t`` is kept as pipeline history (``M_1 = τ_1``); per
entry it is whichever of ``M_{t−1}`` and ``τ_t`` has the larger magnitude::

    M_t[i] = τ_t[i] if |τ_t[i]| > |M_{t−1}[i]| else M_{t−1}[i],      θ_t = θ0 + λ M_t

Equal magnitudes keep ``M_{t−1}`` (the earlier task — what an argmax over the stacked
``[τ_1 … τ_t]`` in task order gives). Applied to every tensor. If the kept ``M`` of a
tensor is missing at t ≥ 2, it is recovered as ``(θ_{t−1} − θ0)/λ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpt.merging.pipeline import MergeResult, MergeStrategy, TensorBatch
from cpt.strategies import register_strategy

MERGED_KEY = "merged"


@dataclass
class MagMaxParams:
    scaling: float = 0.5
    """λ in θ_t = θ0 + λ M_t (0.5)."""


def magmax_merge(previous: torch.Tensor, task_vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per entry the larger-magnitude of the two (ties keep ``previous``), and the mask of
    entries taken from ``task_vector``."""
    take_new = task_vector.abs() > previous.abs()
    return torch.where(take_new, task_vector, previous), take_new


@register_strategy("magmax", params=MagMaxParams, train_from="base",
                   description="continual MagMax: M_t = per-entry larger magnitude of (M_{t-1}, τ_t), θ_t = θ0 + λ·M_t (METHOD §3)")
class MagMax(MergeStrategy):
    def history_keys(self, step, scalars):
        return [MERGED_KEY]

    def merge(self, batch: TensorBatch) -> MergeResult:
        p = self.params
        previous = batch.history.get(MERGED_KEY)
        recovered = False
        if batch.step == 1:
            merged, take_new = batch.task_vector, torch.ones_like(batch.task_vector, dtype=torch.bool)
        else:
            if previous is None:
                if p.scaling == 0:
                    raise ValueError(f"magmax: no kept merged vector for {batch.names[0]} and scaling 0: cannot recover it")
                previous, recovered = batch.state_delta / p.scaling, True
            merged, take_new = magmax_merge(previous, batch.task_vector)
        new_state = batch.base + p.scaling * merged
        update = (new_state - batch.state).flatten(1).norm(dim=1)
        merged_norm = merged.flatten(1).norm(dim=1)
        from_new = take_new.flatten(1).float().mean(dim=1)
        stats = [
            {"norm_update": float(update[i]), "norm_merged": float(merged_norm[i]),
             "fraction_from_new": float(from_new[i]),
             **({"merged_recovered_from_state": True} if recovered else {})}
            for i in range(len(batch.names))
        ]
        return MergeResult(state=new_state, history={MERGED_KEY: merged}, stats=stats)
