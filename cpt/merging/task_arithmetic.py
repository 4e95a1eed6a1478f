"""Task arithmetic, continual form (METHOD §3): θ_t = θ_{t−1} + λ τ_t."""

from __future__ import annotations

from dataclasses import dataclass

from cpt.merging.pipeline import MergeResult, MergeStrategy, TensorBatch
from cpt.strategies import register_strategy


@dataclass
class TaskArithmeticParams:
    scaling: float = 0.3
    """λ: 0.3 by default; METHOD suggests 0.1 for long sequences."""


@register_strategy(
    "task_arithmetic",
    params=TaskArithmeticParams,
    train_from="base",
    description="θ_t = θ_{t-1} + λ·τ_t on every tensor (METHOD §3)",
)
class TaskArithmetic(MergeStrategy):
    def rows_separable(self, target):
        return True  # element-wise on every tensor

    def merge(self, batch: TensorBatch) -> MergeResult:
        update = self.params.scaling * batch.task_vector
        norms = update.flatten(1).norm(dim=1)
        return MergeResult(state=batch.state + update, stats=[{"norm_update": float(n)} for n in norms])
