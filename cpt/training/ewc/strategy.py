"""The registered ``ewc`` strategy: sequential integration + :class:`callbacks.EWCCallback` during training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field

from cpt.integration import IntegrationContext, TaskContext
from cpt.strategies import Strategy, register_strategy
from cpt.training.ewc.penalty import DEFAULT_EWC_LAMBDA


@dataclass
class EWCParams:
    """The ``ewc`` strategy's recipe keys (``strategy: {name: ewc, ...}``)."""

    ewc_lambda: Annotated[float, Field(ge=0)] = DEFAULT_EWC_LAMBDA
    """λ of METHOD §4 (see the :mod:`cpt.training.ewc` docstring for the default)."""
    gamma: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Online-EWC decay: F ← γ·F + F_new at the end of each task (1 = sum of all tasks' Fishers)."""
    fisher_examples: Annotated[int, Field(gt=0)] = 32
    """N: training examples of the finished task the Fisher is averaged over (a seeded sample)."""


@register_strategy(
    "ewc",
    params=EWCParams,
    train_from="state",
    state_is_expert=True,
    description="sequential fine-tuning with the (online) EWC penalty toward earlier tasks' weights",
)
class EWC(Strategy):
    """Integration is sequential; the training-time work is :class:`callbacks.EWCCallback`."""

    def __init__(self, params: EWCParams):
        super().__init__(params)
        self.callback = None

    def training_callbacks(self, context: TaskContext) -> list:
        from cpt.callbacks.ewc import EWCCallback

        self.callback = EWCCallback(
            ewc_lambda=self.params.ewc_lambda,
            gamma=self.params.gamma,
            fisher_examples=self.params.fisher_examples,
            output_dir=Path(context.strategy_dir) / "ewc",
            step=context.step,
            task_name=context.task_name,
        )
        return [self.callback]

    def integrate(self, context: IntegrationContext) -> dict:
        context.write_state_from_model()
        return dict(self.callback.stats) if self.callback is not None else {}
