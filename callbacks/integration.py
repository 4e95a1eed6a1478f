"""``IntegrationCallback``: fold the expert into the model state when training ends."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from cpt.errors import CptError
from cpt.integration import IntegrationContext
from cpt.io import atomic_write_json
from cpt.recipe import DEFAULT_TARGETS
from cpt.strategies import get_strategy
from cpt.tensors import gather_expert_folder, local_model_folder, save_lora_adapter

from ._common import SequencePosition, check_train_from, renamed_keyword, resolve_task

PER_TENSOR_SUFFIX = "per_tensor"


def is_per_tensor_mapping(key: str, value: Any) -> bool:
    """Whether ``stats[key] = value`` holds one entry per tensor (kept in the integration file, never
    sent to trackers: on SmolLM2 that would be ~200 series per step).

    The rule, for every mapping at any depth of a strategy's statistics:

    * its key is ``per_tensor`` or ends with ``_per_tensor`` (``per_tensor``,
      ``effective_scale_per_tensor``), or
    * its keys are tensor names: every key is a dotted parameter path such as
      ``model.layers.0.mlp.up_proj.weight`` (e.g. OPCM's ``norm_update``). Statistic names are
      identifiers without dots, so an aggregate mapping (``diagnostics/dev_sum/{mean, attention,
      mlp}``, LiNeS' ``layer_scales/{0, 1, ...}``) is kept.
    """
    if not isinstance(value, dict):
        return False
    if key == PER_TENSOR_SUFFIX or key.endswith(f"_{PER_TENSOR_SUFFIX}"):
        return True
    return bool(value) and all(isinstance(name, str) and "." in name for name in value)


class IntegrationCallback(SequencePosition, TrainerCallback):
    """Integrates the trained expert E_t into the state θ_t with a registered strategy.

    At ``on_train_end`` it builds an :class:`~cpt.integration.IntegrationContext` and calls
    the strategy's ``integrate``; the new state θ_t replaces ``state_dir`` atomically, with
    a ``cpt_state.json`` marker saying which step it holds. The strategy's statistics are
    written to ``<output_dir>/<t>_<task>.json`` (if ``output_dir`` is given) and their
    aggregate scalars logged through ``trainer.log`` as ``integration/<key>`` (nested keys
    joined with ``/``) once the callback is bound to its trainer with :meth:`bind_trainer`,
    otherwise into ``state.log_history``. Per-tensor statistics stay in the file: a value
    inside a per-tensor mapping (:func:`is_per_tensor_mapping`) is never logged, so the
    trackers get tens of aggregates per step, not one series per tensor.

    One instance serves a whole sequence of tasks: at every ``on_train_begin`` the step t
    is read from ``state_dir``'s marker (one more than the step it holds; 1 when there is
    no state yet), and the state in that folder is θ_{t−1}.

    In a multi-process run (``accelerate launch --num_processes N``, DDP or DeepSpeed) a
    merge strategy whose rule is batch-local (task arithmetic, DARE, MagMax, …; see
    :func:`cpt.merging.batch_io.splits_across_ranks`) is integrated by every rank, each
    merging its share of the tensor batches into the same staging folder; rank 0 joins the
    shard indexes, commits θ_t, records and logs. Other strategies (a whole-model pass:
    GCWM, OPCM, TIES fusionbench, LiNeS, Localize-and-Stitch; training-side strategies)
    integrate on rank 0 while the others go on, as in one process (the log says so).

    Usage::

        from cpt.callbacks import IntegrationCallback

        integration = IntegrationCallback("gcwm", base="HuggingFaceTB/SmolLM2-135M", state_dir="state")
        for name, dataset in tasks.items():
            model = AutoModelForCausalLM.from_pretrained(base)  # GCWM trains every expert from θ0
            trainer = SFTTrainer(model, SFTConfig(output_dir=name, run_name=name), train_dataset=dataset,
                                 callbacks=[integration])
            integration.bind_trainer(trainer)  # statistics go through trainer.log
            trainer.train()                    # at the end: state/ holds θ_t

    Args:
        strategy: a registered strategy's name (see ``cpt strategies``) or a built integrator.
        base: θ0, a local HF folder or a hub id (a cached snapshot of its ``*.json`` and
            ``*.safetensors`` files is used; fetched once if online).
        state_dir: the state folder: θ_{t−1} while task t trains, θ_t after this callback.
        output_dir: where ``<t>_<task>.json`` with the strategy's statistics goes (None: no file).
        train_from: what the expert trained from, ``"state"`` (θ_{t−1}) or ``"base"`` (θ0);
            default: the strategy's own (merge strategies train from θ0).
        targets: regexes of the tensors the strategy merges (default ``cpt.recipe.DEFAULT_TARGETS``).
        params: the strategy's parameters when ``strategy`` is a name.
        history_dir: the strategy's folder for what it keeps across steps (default:
            ``history/`` next to ``state_dir``).
        tokenizer: saved with the state (default: the trainer's ``processing_class``).
        expert_dir: an HF folder holding E_t, read instead of the live model. Under
            DeepSpeed ZeRO-3, when unset, the callback gathers one itself (all ranks take part).
        step: override the step read from the marker (then use one instance per task).
        task_name: the task's name in the marker and file names; default the trainer's
            ``args.run_name`` when set, else ``task<t>``.
        previous_state_dir: θ_{t−1} when it is not in ``state_dir``.
        max_shard_size: largest safetensors shard of θ_t (e.g. ``"500MB"``; default
            ``save_pretrained``'s).
        adapter_dir: with a PEFT (LoRA) model, each task's adapter is also kept here as
            ``<t>_<task>/`` (``adapter_config.json`` + ``adapter_model.safetensors``), which
            ``cpt merge`` and ``cpt geometry`` accept as experts; None: not kept.
        base_dir: deprecated name of ``base`` (a local folder, used as given).
        stats_path: deprecated: the statistics file itself (use ``output_dir``).

    Subclass hooks: :meth:`make_context` (what the strategy sees), :meth:`record` (where
    the statistics go), :meth:`log_metrics` (what is logged).
    """

    def __init__(
        self,
        strategy: str | Any = "sequential",
        *,
        base: str | Path | None = None,
        state_dir: str | Path,
        output_dir: str | Path | None = None,
        train_from: str | None = None,
        targets: list[str] | None = None,
        params: dict[str, Any] | None = None,
        history_dir: str | Path | None = None,
        tokenizer: Any = None,
        expert_dir: str | Path | None = None,
        step: int | None = None,
        task_name: str | None = None,
        previous_state_dir: str | Path | None = None,
        max_shard_size: int | str | None = None,
        adapter_dir: str | Path | None = None,
        base_dir: str | Path | None = None,
        stats_path: str | Path | None = None,
    ):
        name = type(self).__name__
        self.integrator = get_strategy(strategy).build(params or {}) if isinstance(strategy, str) else strategy
        base = renamed_keyword(name, "base_dir", "base", base_dir, base)
        if base is None:
            raise CptError(f"{name}: pass base= (θ0: a local HF folder or a hub id)")
        self.base = base
        self._base_dir = Path(base) if base_dir is not None else None  # the old name took a local folder as is
        self.state_dir = Path(state_dir)
        self.output_dir = Path(output_dir) if output_dir else None
        self.stats_path = (
            Path(renamed_keyword(name, "stats_path", "output_dir", stats_path, None)) if stats_path else None
        )
        self.history_dir = Path(history_dir) if history_dir else self.state_dir.parent / "history"
        self.targets = targets or list(DEFAULT_TARGETS)
        if train_from is None:  # what the strategy's class declares (an instance's class too)
            train_from = getattr(type(self.integrator), "train_from", "state")
        self.train_from = check_train_from(name, train_from)
        self.tokenizer = tokenizer
        #: An HF folder holding E_t (read lazily instead of the live model). Under ZeRO-3,
        #: when unset, the callback writes one itself (all ranks take part in the gathers).
        self.expert_dir = Path(expert_dir) if expert_dir else None
        self.max_shard_size = max_shard_size
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self._init_position(step, task_name, previous_state_dir)
        self.trainer = None
        self.seconds: float | None = None
        self.stats: dict[str, Any] | None = None

    @property
    def base_dir(self) -> Path:
        """θ0's local folder (a hub id is resolved to its cached snapshot on first use)."""
        if self._base_dir is None:
            self._base_dir = local_model_folder(self.base, field=f"{type(self).__name__}: base")
        return self._base_dir

    # ------------------------------------------------------------------ hooks
    def bind_trainer(self, trainer) -> None:
        """Log through ``trainer.log`` so the trainer's reporters receive the statistics."""
        self.trainer = trainer

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
            max_shard_size=self.max_shard_size,
        )

    def record(self, stats: dict[str, Any]) -> None:
        path = self.stats_path
        if path is None and self.output_dir is not None:
            path = self.output_dir / f"{self.step}_{self.task_name}.json"
        if path is not None:
            atomic_write_json(path, stats)

    def log_metrics(self, stats: dict[str, Any]) -> dict[str, float]:
        """``integration/<key>`` for every number in ``stats`` (nested keys joined with ``/``) that is
        not inside a per-tensor mapping (:func:`is_per_tensor_mapping`): the aggregates only."""
        metrics: dict[str, float] = {}

        def add(prefix: str, values: dict[str, Any]) -> None:
            for key, value in values.items():
                if (not prefix and key in ("step", "task")) or is_per_tensor_mapping(key, value):
                    continue
                if isinstance(value, dict):
                    add(f"{prefix}{key}/", value)
                elif isinstance(value, (int, float)):  # bools too (as 0.0/1.0); None and strings are left out
                    metrics[f"integration/{prefix}{key}"] = float(value)

        add("", stats)
        return metrics

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        self._start_task(args)
        if state.is_world_process_zero:
            self.base_dir  # a hub id that cannot be fetched fails now, not after training  # noqa: B018

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        started = time.perf_counter()
        if self._position is None:  # on_train_begin was not called (e.g. a hand-driven callback)
            self._start_task(args)
        self._position = None  # the next task reads the marker again
        expert_dir, temporary = self.expert_dir, False
        if expert_dir is None:
            # every rank; in the recipe's shards, as a state that is the expert copies this folder
            expert_dir = gather_expert_folder(
                model, self.state_dir.parent / f".expert-{self.step}", self.max_shard_size
            )
            temporary = expert_dir is not None
        if self.adapter_dir is not None:  # every rank (a ZeRO-3 gather); the state is unchanged by it
            save_lora_adapter(model, self.adapter_dir / f"{self.step}_{self.task_name}")
        every_rank = self._splits_across_ranks()
        if not state.is_world_process_zero and not every_rank:
            return
        if every_rank:  # an expert folder rank 0 writes (ZeRO-3) is complete once all ranks are here
            from cpt import ranks

            ranks.barrier()
        context = self.make_context(model, self.tokenizer if self.tokenizer is not None else processing_class)
        context.expert_dir = expert_dir
        try:
            stats = self.integrator.integrate(context) or {}
        finally:
            if temporary and state.is_world_process_zero:  # rank 0 wrote it (the others may still read it)
                shutil.rmtree(expert_dir, ignore_errors=True)
        self.seconds = time.perf_counter() - started
        if not state.is_world_process_zero:  # its share is merged; rank 0 records and logs the step
            return
        self.stats = {"step": self.step, "task": self.task_name, "seconds": self.seconds, **stats}
        self.record(self.stats)
        metrics = self.log_metrics(self.stats)
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    def _splits_across_ranks(self) -> bool:
        """In a multi-process run, whether every rank takes part in ``integrate`` (a merge
        strategy whose batches are divided among the ranks, :func:`cpt.merging.batch_io.splits_across_ranks`);
        otherwise rank 0 integrates alone while the others go on."""
        from cpt import ranks
        from cpt.merging.contract import MergeStrategy

        if ranks.world()[1] == 1 or not isinstance(self.integrator, MergeStrategy):
            return False
        from cpt.merging.batch_io import splits_across_ranks

        return splits_across_ranks(self.integrator)

    def _start_task(self, args) -> None:
        self._position = resolve_task(args, state_dir=self.state_dir, **self._overrides)
        self.step, self.task_name = self._position.step, self._position.task_name
        self.previous_state_dir = self._position.previous_state_dir
