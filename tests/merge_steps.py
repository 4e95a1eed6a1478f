"""Experts, weights and the per-step context for tests that drive the streamed merge pipeline on the tiny model."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.integration import IntegrationContext
from cpt.recipe import DEFAULT_TARGETS


def perturbed(base: Path, seed: int):
    """An expert: θ0 with N(0, 0.01²) noise added to every parameter (deterministic in ``seed``)."""
    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    return model


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model saved in ``folder``, by name."""
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def context(root: Path, base: Path, model, step: int, train_from: str = "base") -> IntegrationContext:
    """Step ``step`` (task ``t<step>``) of a run whose state and history live in ``root / "run"``."""
    run = root / "run"
    return IntegrationContext(
        step=step,
        task_name=f"t{step}",
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(base),
        state_dir=run / "state",
        base_dir=base,
        previous_state_dir=(run / "state") if step > 1 else None,
        history_dir=run / "history",
        target_patterns=DEFAULT_TARGETS,
        train_from=train_from,
    )
