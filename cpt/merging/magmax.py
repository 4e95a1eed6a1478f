"""MagMax, continual form (METHOD §3).

An unscaled running vector ``M_t`` is kept as pipeline history (``M_1 = τ_1``); per
entry it is whichever of ``M_{t−1}`` and ``τ_t`` has the larger magnitude::

    M_t[i] = τ_t[i] if |τ_t[i]| ≥ |M_{t−1}[i]| else M_{t−1}[i],      θ_t = θ0 + λ M_t

Equal magnitudes keep ``τ_t`` (the later task), as the reference does (FusionBench
``fusion_bench/method/magmax``: ``mask = current.abs() >= running.abs()``); an argmax
over the stacked ``[τ_1 … τ_t]`` would keep the earlier one. Applied to every tensor. If the kept ``M`` of a
tensor is missing at t ≥ 2, it is recovered as ``(θ_{t−1} − θ0)/λ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpt.merging.contract import RunningMergeStrategy
from cpt.strategies import register_strategy


@dataclass
class MagMaxParams:
    scaling: float = 0.5
    """λ in θ_t = θ0 + λ M_t (0.5)."""


def magmax_merge(previous: torch.Tensor, task_vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per entry the larger-magnitude of the two (equal magnitudes take ``task_vector``, the
    reference's ``>=``), and the mask of entries taken from ``task_vector``."""
    take_new = task_vector.abs() >= previous.abs()
    return torch.where(take_new, task_vector, previous), take_new


@register_strategy(
    "magmax",
    params=MagMaxParams,
    train_from="base",
    description="continual MagMax: M_t = per-entry larger magnitude of (M_{t-1}, τ_t), θ_t = θ0 + λ·M_t (METHOD §3)",
)
class MagMax(RunningMergeStrategy):
    def rows_separable(self, target):
        return True  # element-wise on every tensor

    def first_stats(self, task_vector):
        return {"fraction_from_new": torch.ones(task_vector.shape[0])}

    def combine(self, previous, task_vector):
        merged, take_new = magmax_merge(previous, task_vector)
        return merged, {"fraction_from_new": take_new.flatten(1).float().mean(dim=1)}
