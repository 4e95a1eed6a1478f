"""Task arithmetic, continual form (METHOD §3): θ_t = θ_{t−1} + λ τ_t."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cpt.merging.contract import MergeResult, MergeStrategy, TensorBatch
from cpt.strategies import register_strategy


@dataclass
class TaskArithmeticParams:
    """Args:
    scaling: λ, 0.3 by default; METHOD suggests 0.1 for long sequences.
    non_target: what non-target tensors (embeddings, norms, biases, lm_head; see
        ``strategy.targets``) become. ``add`` (default, METHOD §3): the same rule as the
        targets, θ_t = θ_{t−1} + λ τ_t. ``keep_base``: they stay at θ0, as GCWM keeps them
        (``non_target: base``); with ``scaling: 0.2`` this is the control that isolates
        GCWM's geometry (METHOD §2.9: GCWM at its defaults ≈ task arithmetic with λ = 0.2
        on the target tensors; ``recipes/gcwm_control_ta.yaml``).
    """

    scaling: float = 0.3
    non_target: Literal["add", "keep_base"] = "add"


@register_strategy(
    "task_arithmetic",
    params=TaskArithmeticParams,
    train_from="base",
    description="θ_t = θ_{t-1} + λ·τ_t on every tensor (METHOD §3); non_target: keep_base leaves non-targets at θ0",
)
class TaskArithmetic(MergeStrategy):
    def rows_separable(self, target):
        return True  # element-wise on every tensor

    def merge(self, batch: TensorBatch) -> MergeResult:
        if not batch.target and self.params.non_target == "keep_base":
            norms = (batch.base - batch.state).flatten(1).norm(dim=1)
            return MergeResult(state=batch.base.clone(), stats=[{"norm_update": float(n)} for n in norms])
        update = self.params.scaling * batch.task_vector
        norms = update.flatten(1).norm(dim=1)
        return MergeResult(state=batch.state + update, stats=[{"norm_update": float(n)} for n in norms])
