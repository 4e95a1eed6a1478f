"""Public ``transformers.TrainerCallback``s of cpt: add them to any TRL/HF trainer, or subclass them."""

from callbacks.integration import IntegrationCallback

__all__ = ["IntegrationCallback"]
