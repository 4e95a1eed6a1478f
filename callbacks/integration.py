"""``IntegrationCallback``: fold the expert into the model state when training ends."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from cpt.integration import IntegrationContext
from cpt.io import atomic_write_json
from cpt.recipe import DEFAULT_TARGETS
from cpt.strategies import get_strategy
from cpt.tensors import is_zero3, save_model_folder


class IntegrationCallback(TrainerCallback):
    """Integrates the trained expert E_t into the state θ_t with a registered strategy.

    Works in cpt's runner and in a plain TRL script::

        trainer = SFTTrainer(model, args, train_dataset=data, callbacks=[
            IntegrationCallback("sequential", state_dir="state", base_dir="base_model", step=1, task_name="plural"),
        ])

    At ``on_train_end`` it builds an :class:`~cpt.integration.IntegrationContext` and calls
    the strategy's ``integrate``; the new state is written atomically to ``state_dir``
    and the strategy's statistics to ``stats_path`` (if given). Subclasses can override
    :meth:`make_context` (what the strategy sees) or :meth:`record` (where stats go).
    """

    def __init__(
        self,
        strategy: str | Any = "sequential",
        *,
        state_dir: str | Path,
        base_dir: str | Path,
        step: int,
        task_name: str,
        previous_state_dir: str | Path | None = None,
        history_dir: str | Path | None = None,
        params: dict[str, Any] | None = None,
        targets: list[str] | None = None,
        train_from: str | None = None,
        tokenizer: Any = None,
        stats_path: str | Path | None = None,
        expert_dir: str | Path | None = None,
    ):
        self.integrator = get_strategy(strategy).build(params or {}) if isinstance(strategy, str) else strategy
        self.state_dir = Path(state_dir)
        self.base_dir = Path(base_dir)
        self.step = step
        self.task_name = task_name
        self.previous_state_dir = Path(previous_state_dir) if previous_state_dir else None
        self.history_dir = Path(history_dir) if history_dir else self.state_dir.parent / "history"
        self.targets = targets or list(DEFAULT_TARGETS)
        if train_from is None:  # what the strategy's class declares (an instance's class too)
            train_from = getattr(type(self.integrator), "train_from", "state")
        if train_from not in ("state", "base"):
            raise ValueError("train_from must be 'state' or 'base'")
        self.train_from = train_from
        self.tokenizer = tokenizer
        self.stats_path = Path(stats_path) if stats_path else None
        #: An HF folder holding E_t (read lazily instead of the live model). Under ZeRO-3,
        #: when unset, the callback writes one itself (all ranks take part in the gathers).
        self.expert_dir = Path(expert_dir) if expert_dir else None
        self.seconds: float | None = None
        self.stats: dict[str, Any] | None = None

    def make_context(self, model, tokenizer) -> IntegrationContext:
        return IntegrationContext(
            step=self.step,
            task_name=self.task_name,
            model=model,
            tokenizer=tokenizer,
            state_dir=self.state_dir,
            base_dir=self.base_dir,
            previous_state_dir=self.previous_state_dir,
            history_dir=self.history_dir,
            target_patterns=self.targets,
            train_from=self.train_from,
        )

    def record(self, stats: dict[str, Any]) -> None:
        if self.stats_path is not None:
            atomic_write_json(self.stats_path, stats)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        started = time.perf_counter()
        expert_dir, temporary = self.expert_dir, False
        if expert_dir is None and model is not None and is_zero3(model):
            expert_dir, temporary = self.state_dir.parent / f".expert-{self.step}", True
            save_model_folder(model, None, expert_dir)  # a collective: every rank gathers
        if not state.is_world_process_zero:
            return
        context = self.make_context(model, self.tokenizer if self.tokenizer is not None else processing_class)
        context.expert_dir = expert_dir
        try:
            stats = self.integrator.integrate(context) or {}
        finally:
            if temporary:
                shutil.rmtree(expert_dir, ignore_errors=True)
        self.seconds = time.perf_counter() - started
        self.stats = {"step": self.step, "task": self.task_name, "seconds": self.seconds, **stats}
        self.record(self.stats)
