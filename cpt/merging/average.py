"""Weight averaging, continual form (METHOD §3): θ_t = ((t−1) θ_{t−1} + E_t) / t."""

from __future__ import annotations

from dataclasses import dataclass

from cpt.merging.contract import MergeResult, MergeStrategy, TensorBatch
from cpt.strategies import register_strategy


@dataclass
class AverageParams:
    """Averaging has no parameters: the running mean of the experts."""


@register_strategy(
    "average",
    params=AverageParams,
    train_from="base",
    description="running mean of the experts: θ_t = ((t-1)·θ_{t-1} + E_t)/t (METHOD §3)",
)
class Average(MergeStrategy):
    def rows_separable(self, target):
        return True  # element-wise on every tensor

    def plain_sum_weights(self, step):
        return ((step - 1) / step, 1 / step)  # θ_t − θ0 = ((t−1)/t)(θ_{t−1} − θ0) + τ_t/t: dev_sum = 0

    def merge(self, batch: TensorBatch) -> MergeResult:
        t = batch.step
        new_state = ((t - 1) * batch.state + batch.expert) / t
        norms = (new_state - batch.state).flatten(1).norm(dim=1)
        return MergeResult(state=new_state, stats=[{"norm_update": float(n)} for n in norms])
