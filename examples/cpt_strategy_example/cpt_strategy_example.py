"""An example third-party cpt strategy: task arithmetic restricted to the target tensors.

``θ_t = θ_{t−1} + λ·τ_t`` on the target tensors (the attention and MLP projections a recipe's
``targets`` select), ``θ_t = θ_{t−1}`` on every other tensor (embeddings, norms), so the
experts' changes to those are dropped. Installed, it is a strategy like the built-ins::

    cpt strategies                      # lists targeted_task_arithmetic
    cpt merge --method targeted_task_arithmetic BASE EXPERT_1 EXPERT_2 --output merged --set scaling=0.5

and ``strategy: {name: targeted_task_arithmetic, scaling: 0.5}`` in a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from cpt.merging.contract import MergeResult, MergeStrategy, TensorBatch
from cpt.strategies import register_strategy


@dataclass
class TargetedTaskArithmeticParams:
    scaling: Annotated[float, Field(gt=0)] = 0.3
    """λ, the weight of each task vector on the target tensors."""


@register_strategy(
    "targeted_task_arithmetic",
    params=TargetedTaskArithmeticParams,
    train_from="base",
    description="θ_t = θ_{t-1} + λ·τ_t on target tensors, θ_{t-1} elsewhere (example package)",
)
class TargetedTaskArithmetic(MergeStrategy):
    def rows_separable(self, target: bool) -> bool:
        return True  # element-wise: the pipeline may hand over large tensors in row blocks

    def merge(self, batch: TensorBatch) -> MergeResult:
        if not batch.target:
            return MergeResult(state=batch.state, stats=[{"norm_update": 0.0} for _ in batch.names])
        update = self.params.scaling * batch.task_vector
        norms = update.flatten(1).norm(dim=1)
        return MergeResult(state=batch.state + update, stats=[{"norm_update": float(norm)} for norm in norms])
