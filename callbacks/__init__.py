"""Public ``transformers.TrainerCallback``s of cpt: add them to any TRL/HF trainer, or subclass them."""

from callbacks.ewc import EWCCallback
from callbacks.geometry import GeometryConflictCallback
from callbacks.integration import IntegrationCallback

__all__ = ["EWCCallback", "GeometryConflictCallback", "IntegrationCallback"]
