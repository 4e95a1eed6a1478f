"""Sequential fine-tuning (METHOD §4): E_t is trained from θ_{t−1}, and θ_t = E_t."""

from __future__ import annotations

from dataclasses import dataclass

from cpt.integration import IntegrationContext
from cpt.strategies import Strategy, register_strategy


@dataclass
class SequentialParams:
    """Sequential fine-tuning has no parameters."""


@register_strategy(
    "sequential",
    params=SequentialParams,
    train_from="state",
    state_is_expert=True,
    description="fine-tune the current state on each task; the state becomes the expert",
)
class Sequential(Strategy):
    def integrate(self, context: IntegrationContext) -> dict:
        context.write_state_from_model()
        return {}
