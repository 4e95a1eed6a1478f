"""Public ``transformers.TrainerCallback``s of cpt: add them to any TRL/HF trainer, or subclass them."""

from callbacks.aim import AIMMergingCallback
from callbacks.ewc import EWCCallback
from callbacks.geometry import GeometryConflictCallback
from callbacks.integration import IntegrationCallback

__all__ = ["AIMMergingCallback", "EWCCallback", "GeometryConflictCallback", "IntegrationCallback"]
