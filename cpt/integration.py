"""What a strategy sees when it integrates an expert into the state (DESIGN: integration).

The :class:`IntegrationContext` hands a strategy the live expert model, the folders of the
base θ0 and the previous state θ_{t−1}, a folder of its own for what it keeps between
steps (``history/``), and the one way to write the new state θ_t: atomically, as an HF
folder that records which step it holds.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cpt.io import staged_dir
from cpt.tensors import save_model_folder, write_model_files


@dataclass
class IntegrationContext:
    step: int
    """1-based index t of the task just trained."""
    task_name: str
    model: torch.nn.Module | None
    """The expert E_t as trained (possibly PEFT- or DDP-wrapped); None when ``expert_dir`` is given."""
    tokenizer: Any
    state_dir: Path
    """Where θ_t goes (replaced atomically)."""
    base_dir: Path
    """HF folder of θ0."""
    previous_state_dir: Path | None
    """HF folder of θ_{t−1}; None at t = 1 (θ0)."""
    history_dir: Path
    """The strategy's own folder for what it keeps across steps."""
    target_patterns: list[str] = field(default_factory=list)
    train_from: str = "state"
    """What the expert trained from: ``state`` (θ_{t−1}) or ``base`` (θ0)."""
    expert_dir: Path | None = None
    """An HF folder of E_t, read tensor by tensor instead of a live model (``cpt merge``)."""
    max_shard_size: int | str | None = None
    """Largest shard of θ_t's safetensors files (e.g. ``"500MB"``); None: ``save_pretrained``'s default."""

    def marker(self) -> dict[str, Any]:
        return {"step": self.step, "task": self.task_name}

    def write_state_from_model(self, model: torch.nn.Module | None = None) -> None:
        """θ_t ← the weights of ``model`` (default: the expert), LoRA merged, atomically."""
        with staged_dir(self.state_dir) as staged:
            if model is None and self.expert_dir is not None:  # the expert is already a folder
                shutil.copytree(self.expert_dir, staged, dirs_exist_ok=True)
                write_model_files(staged, tokenizer=self.tokenizer, marker=self.marker())
            else:
                save_model_folder(
                    model if model is not None else self.model,
                    self.tokenizer,
                    staged,
                    marker=self.marker(),
                    max_shard_size=self.max_shard_size,
                )


@dataclass
class TaskContext:
    """What a strategy's training-time hooks see (replay buffers, EWC, ...):
    :meth:`cpt.strategies.Strategy.prepare_train_dataset` and
    :meth:`cpt.strategies.Strategy.training_callbacks`."""

    step: int
    task_name: str
    task_names: list[str]
    train_dataset: Any
    """Task t's own formatted examples (``prompt``/``completion`` columns)."""
    strategy_dir: Path
    """The strategy's persistent folder in the run directory (kept across resume)."""
    seed: int
