"""The task loop: train an expert per task, integrate it, evaluate the state on every task.

Read :meth:`TaskSequenceRunner.run` first: ``setup → per task: model, callbacks, trainer,
record → cleanup``, each a short method below.

The run directory (DESIGN.md, :mod:`cpt.run_directory`) is the only state. A run killed at
any moment and started again with the same command continues from the last completed task:

* ``manifest.json`` marks a task ``done`` only after its evaluation row is saved;
* ``state/`` is replaced atomically and records the step it holds (``cpt_state.json``),
  so a kill after integration but before evaluation resumes at evaluation;
* a kill during training retrains the task from the previous state with the same seed
  (or from the trainer's last checkpoint when the recipe saves checkpoints).
"""

from __future__ import annotations

import gc
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainerCallback

from cpt.errors import CptError
from cpt.io import atomic_write_json, atomic_write_text, read_json, recover_dir
from cpt.models import RecipeModels
from cpt.recipe import Recipe, TaskSpec
from cpt.run_directory import MANIFEST_FORMAT, VERSIONED_PACKAGES, RunDirectory, library_versions, utc_now
from cpt.stopping import raise_if_stop_requested
from cpt.tensors import gather_expert_folder, is_zero3, no_zero3_init, read_marker, release_deepspeed_engine
from cpt.trackers import STEPS_KEY, offset_tracker_steps, sequence_step

__all__ = [
    "MANIFEST_FORMAT",
    "VERSIONED_PACKAGES",
    "ExpertEvaluation",
    "RunDirectory",
    "RunResult",
    "TaskSequenceRunner",
    "library_versions",
    "present_rows",
]


def present_rows(matrix: dict) -> list[list[float | None]]:
    """Rows 0..k of the accuracy matrix, k the last evaluated step; a skipped row (e.g. the
    base with ``evaluate_base: false``) stays in place as Nones so indices keep their meaning."""
    rows = matrix["rows"]
    last = max((i for i, row in enumerate(rows) if row is not None), default=-1)
    width = len(matrix["tasks"])
    return [row if row is not None else [None] * width for row in rows[: last + 1]]


def log(message: str) -> None:
    print(f"[cpt] {message}", file=sys.stderr, flush=True)


def _scores_text(task_names: list[str], row: list[float | None]) -> str:
    """``plural=0.854  past_tense=-`` (``-``: an entry not evaluated, e.g. with ``evaluation.rows: needed``)."""
    return "  ".join(f"{name}={'-' if score is None else f'{score:.3f}'}" for name, score in zip(task_names, row))


def _peak_memory() -> dict[str, float]:
    """This process's peak resident memory so far, and its peak CUDA allocation since the task began (GiB)."""
    import resource

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"peak_host_rss_gib": round(max_rss / (2**30 if sys.platform == "darwin" else 2**20), 3)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return peak


@dataclass
class RunResult:
    run_dir: Path
    matrix: list[list[float]]
    expert_scores: list[float | None]
    metrics: dict[str, Any]
    task_names: list[str]
    general_ability: dict | None = None
    """:func:`cpt.evaluation.general_ability_kept` of the recipe's probes; ``None`` without probes."""


class Stopwatch:
    """Seconds since :meth:`start` (a task's training time, read by a callback at ``on_train_end``)."""

    def __init__(self):
        self.started: float | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started if self.started is not None else 0.0


class ExpertEvaluation(TrainerCallback):
    """The runner's own work when a task's training ends, before integration replaces E_t.

    It must come after the strategy's callbacks and before the geometry and integration
    callbacks in the trainer's list: it scores the expert while it still exists and, under
    ZeRO-3, gathers it once into ``expert_dir`` so the callbacks after it read that folder
    instead of gathering again.

    Usage::

        trainer = CptSFTTrainer(..., callbacks=[ExpertEvaluation(...), geometry, integration])

    Args:
        expert_dir: where a ZeRO-3-partitioned expert is gathered (module by module).
        expert_readers: callbacks with an ``expert_dir`` attribute, pointed at the gathered folder.
        score_expert: ``score_expert(model)`` scores E_t and records it (main process), or
            ``None`` when experts are not evaluated.
        load_model: ``load_model(folder)`` a whole model from an HF folder, for scoring a gathered expert.
        record_trained: ``record_trained(state)`` records the task as trained (every process).
        max_shard_size: largest shard of the gathered folder (the recipe's: it may become θ_t).
    """

    def __init__(
        self,
        *,
        expert_dir: Path,
        expert_readers: list[TrainerCallback],
        score_expert: Callable[[torch.nn.Module], None] | None,
        load_model: Callable[[str], torch.nn.Module],
        record_trained: Callable[[Any], None],
        max_shard_size: int | str | None = None,
    ):
        self.expert_dir = expert_dir
        self.max_shard_size = max_shard_size
        self.expert_readers = expert_readers
        self.score_expert = score_expert
        self.load_model = load_model
        self.record_trained = record_trained

    def on_train_end(self, args, state, control, model=None, **kwargs):
        evaluate = state.is_world_process_zero and self.score_expert is not None
        # ZeRO-3: gather the expert once, module by module, into a folder that evaluation,
        # geometry and integration then read (no rank holds it all). A collective: every rank calls it.
        gathered = gather_expert_folder(model, self.expert_dir, self.max_shard_size)
        if gathered is not None:
            for callback in self.expert_readers:
                callback.expert_dir = gathered
            if evaluate:
                model = self.load_model(str(gathered))
        if evaluate:
            self.score_expert(model)
        self.record_trained(state)


class TaskSequenceRunner:
    """Runs a recipe's task sequence in its run directory (see module docstring).

    Usage::

        TaskSequenceRunner(load_recipe("recipes/quickstart.yaml")).run()

    :meth:`setup` sets what every task reads: ``manifest`` and ``matrix`` (the run's records,
    saved by the main process), ``strategy_info`` and ``train_from``, ``base`` (θ0's path or
    hub id) and its ``tokenizer``, ``task_names`` and ``task_data``.
    """

    def __init__(self, recipe: Recipe, *, overwrite: bool = False, expert_cache=None, merge_cache=None):
        """Args:
        recipe: the validated recipe.
        overwrite: replace a run directory that holds another recipe's run (moved aside until
            the new run has started).
        expert_cache: a :class:`cpt.study.expert_cache.ExpertCache` that θ0-trained experts are
            taken from and stored in (``cpt study`` passes one); default: one when
            ``CPT_EXPERT_CACHE=1``, else none.
        merge_cache: a :class:`cpt.merging.gcwm.GCWMMergeCache` a GCWM run reads its merges from
            and stores them in (``cpt study`` passes one to variants that share their ``m_t``).
        """
        from accelerate import PartialState

        self.recipe = recipe
        self.rundir = RunDirectory(recipe.run_dir)
        self.overwrite = overwrite
        self.expert_cache = expert_cache
        self.merge_cache = merge_cache
        self._merge_cache_counted = merge_cache.counts() if merge_cache is not None else None
        self.distributed = PartialState()
        self.is_main = self.distributed.is_main_process
        #: θ0, models, tokenizer and LoRA config, loaded as the recipe says (also used by ``cpt plan``).
        self.models = RecipeModels(recipe, self.distributed)

    # ------------------------------------------------------------------ the loop
    def run(self) -> RunResult:
        self.setup()
        for step, (task, data) in enumerate(zip(self.recipe.tasks, self.task_data), start=1):
            if self.manifest["tasks"][step - 1]["status"] != "done":
                raise_if_stop_requested()  # a SIGTERM a library swallowed (cpt.stopping)
                self.run_task(step, task, data)
        return self.cleanup()

    def setup(self) -> None:
        """The run directory, the strategy, θ0 and its tokenizer, every task's data, the base row."""
        from cpt.data import build_task_data
        from cpt.strategies import get_strategy

        recipe = self.recipe
        self.manifest = self.prepare_run_dir()
        self.strategy_info = get_strategy(recipe.strategy.name)
        # What experts train from is declared by the strategy's class; a recipe may override it.
        self.train_from = recipe.strategy.train_from or self.strategy_info.strategy_class.train_from
        self.base = self.models.resolve_base()
        self.tokenizer = self.models.load_tokenizer(self.base)
        self.task_names = [task.name for task in recipe.tasks]
        log(
            f"run {recipe.name} → {self.rundir.root} ({len(self.task_names)} tasks, "
            f"strategy {self.strategy_info.name}, experts from {self.train_from})"
        )
        self.task_data = [build_task_data(task, index, recipe.seed) for index, task in enumerate(recipe.tasks)]
        for index, data in enumerate(self.task_data):
            self.manifest["tasks"][index].update(train_examples=len(data.train), eval_examples=len(data.eval_examples))
        self.matrix = read_json(self.rundir.matrix_path) or {
            "tasks": self.task_names,
            "rows": [None] * (len(self.task_names) + 1),
            "expert_scores": [None] * len(self.task_names),
        }
        self.probe_data = self._build_probe_data()
        if recipe.probes:  # probe columns beside the task columns, rows aligned (old matrices have none)
            self.matrix.setdefault("probes", [probe.name for probe in recipe.probes])
            self.matrix.setdefault("probe_rows", [None] * (len(self.task_names) + 1))
        self._check_evaluation_rows()
        if self.matrix["rows"][0] is None and recipe.evaluation.evaluate_base:
            self._evaluate_base()
        elif recipe.probes and self.matrix["probe_rows"][0] is None and recipe.evaluation.evaluate_base:
            self._evaluate_base_probes()  # a base row given without its probe scores (e.g. copied)

    def run_task(self, step: int, task: TaskSpec, data) -> None:
        """Train and integrate task ``step`` (unless a kill came after its integration), then evaluate θ_t."""
        marker = read_marker(self.rundir.state) if self.rundir.state.exists() else None
        held_step = marker["step"] if marker else 0
        if held_step not in (step - 1, step):
            raise CptError(
                f"{self.rundir.state} holds step {held_step} but task {step} is next; the run directory "
                "is inconsistent: rerun with --overwrite"
            )
        if held_step == step - 1:
            live_state = self.train_task(step, task, data)
        else:
            log(f"task {step}/{len(self.task_names)} {task.name}: integrated before the interruption; evaluating")
            live_state = None
        raise_if_stop_requested()
        if self.is_main:
            self._evaluate_state(step, task, live_state)
        del live_state
        gc.collect()
        self.distributed.wait_for_everyone()

    def train_task(self, step: int, task: TaskSpec, data) -> torch.nn.Module | None:
        """Task t's expert: model → callbacks → trainer → train (integration runs at its end) → record.

        Returns the live state θ_t when it is exactly the expert and whole on this process
        (evaluated without reloading), else ``None``.
        """
        from transformers import set_seed
        from trl import SFTConfig

        from cpt.integration import TaskContext
        from cpt.training.trainer import CptSFTTrainer

        recipe = self.recipe
        record = self.manifest["tasks"][step - 1]
        previous_state = self.rundir.state if step > 1 else None
        start_from = str(previous_state) if (self.train_from == "state" and previous_state is not None) else self.base
        log(
            f"task {step}/{len(self.task_names)} {task.name}: training on {len(data.train)} task examples from "
            f"{'θ_{t-1}' if start_from != self.base else 'θ0'}"
        )
        checkpoints = self._trainer_checkpoints(task)

        # Same seed for the same task whether or not the run was interrupted before it.
        # The SFTConfig comes before the model: with DeepSpeed ZeRO-3 and zero3_init_flag it
        # makes from_pretrained partition the weights while loading.
        args = SFTConfig(
            output_dir=str(self.rundir.work(task.name)), seed=recipe.seed + step, **recipe.training_args(task)
        )
        set_seed(recipe.seed + step)
        model = self.models.load_model(start_from)

        # A fresh strategy instance per task; its hooks see the task before the trainer exists.
        strategy = self.strategy_info.build(recipe.strategy.params)
        if self.merge_cache is not None and hasattr(strategy, "merge_cache"):
            strategy.merge_cache = self.merge_cache
        task_context = TaskContext(
            step=step,
            task_name=task.name,
            task_names=self.task_names,
            train_dataset=data.train,
            strategy_dir=self.rundir.strategy,
            seed=recipe.seed,
        )
        train_dataset = strategy.prepare_train_dataset(task_context)
        strategy_callbacks = strategy.training_callbacks(task_context)
        stopwatch = Stopwatch()
        integration = self._integration_callback(step, task, strategy, previous_state)
        diagnostics = self._geometry_callbacks(step, task, previous_state)
        expert_evaluation = ExpertEvaluation(
            expert_dir=self.rundir.work(task.name) / "expert",
            expert_readers=[*diagnostics, integration],
            score_expert=(lambda expert: self._score_expert(step, task, data, expert))
            if recipe.evaluation.evaluate_experts
            else None,
            load_model=self.models.load_eval_model,
            record_trained=lambda state: self._record_trained(record, state, stopwatch),
            max_shard_size=recipe.max_shard_size,
        )
        trainer = CptSFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=self.tokenizer,
            peft_config=self.models.peft_config(),
            # The divergence monitor first: it stops a stalled or exploding task before anyone else acts on
            # the step. Order matters at on_train_end: score E_t, then measure geometry, then integrate.
            callbacks=[*self._divergence_monitors(), *strategy_callbacks, expert_evaluation, *diagnostics, integration],
        )
        # Metrics go through trainer.log (and its report_to trackers); strategy callbacks may also use its tokenization.
        for callback in [*strategy_callbacks, *diagnostics, integration]:
            if callable(getattr(callback, "bind_trainer", None)):
                callback.bind_trainer(trainer)
        self._point_trackers(trainer.callback_handler.callbacks)  # TensorBoard logs under the run directory
        offset_tracker_steps(trainer.callback_handler.callbacks, self._sequence_step(step - 1))  # one axis per run

        # Only an expert that is a function of θ0, the task's own data and the training settings is cached.
        cacheable = not strategy_callbacks and train_dataset is data.train
        self._train(
            trainer, step, task, record, checkpoints, stopwatch, train_dataset=train_dataset, cacheable=cacheable
        )
        self._record_integrated(record, integration, diagnostics, task)
        live_state = trainer.model if self.strategy_info.state_is_expert and not is_zero3(trainer.model) else None
        release_deepspeed_engine(trainer.accelerator)  # else every task's engine outlives it
        del trainer
        return live_state

    def cleanup(self) -> RunResult:
        """The continual metrics, the final manifest, the printed matrix and the report."""
        from cpt.evaluation import continual_metrics, format_matrix_table

        matrix = self.matrix if self.is_main else read_json(self.rundir.matrix_path)  # the main process saved it
        rows = present_rows(matrix)
        metrics = continual_metrics(rows, matrix["expert_scores"])
        kept = self._general_ability(matrix)
        if self.is_main:
            self.manifest["status"] = "complete"
            self.manifest["metrics"] = metrics
            if kept is not None:
                self.manifest["general_ability_kept"] = kept
            self.rundir.write_manifest(self.manifest)
            probe_table = (
                dict(probe_rows=matrix["probe_rows"][: len(rows)], probe_names=matrix["probes"]) if kept else {}
            )
            print(format_matrix_table(rows, self.task_names, matrix["expert_scores"], metrics, **probe_table))
            print(f"run directory: {self.rundir.root}")
            self._close_trackers()
            self._write_report()
        return RunResult(self.rundir.root, matrix["rows"], matrix["expert_scores"], metrics, self.task_names, kept)

    # ------------------------------------------------------------------ set-up
    def prepare_run_dir(self) -> dict:
        """Create, resume or (with ``overwrite``) replace the run directory; returns its manifest.

        Public so that a caller (``cpt study``) can seed a new run directory, e.g. with a shared
        base row, before :meth:`run`; calling it again from :meth:`setup` resumes what it made.
        """
        from cpt.recovery import clean_staging, drop_previous, move_aside, recover_interrupted_overwrite

        if self.is_main:  # an --overwrite killed before the new run started: the old run comes back first
            recover_interrupted_overwrite(self.rundir.root)
        self.distributed.wait_for_everyone()
        manifest = self.rundir.read_manifest()
        fingerprint = self.recipe.fingerprint()
        if manifest is not None and manifest.get("recipe_fingerprint") != fingerprint:
            if not self.overwrite:
                raise CptError(
                    f"{self.rundir.root} holds a run of a different recipe (fingerprint "
                    f"{manifest.get('recipe_fingerprint')} != {fingerprint}); "
                    "pass --overwrite to start it again, or change 'name' or 'output_dir'"
                )
            manifest = None
        if manifest is None and self.is_main:
            if self.rundir.root.exists() and any(self.rundir.root.iterdir()):
                if not self.overwrite and not (self.rundir.root / "manifest.json").exists():
                    raise CptError(
                        f"{self.rundir.root} exists and is not a cpt run directory; pass --overwrite to "
                        "replace it or choose another 'name'"
                    )
                move_aside(self.rundir.root)  # kept as <name>.previous until the new run has started
            self.rundir.root.mkdir(parents=True, exist_ok=True)
            manifest = {
                "format": MANIFEST_FORMAT,
                "run_name": self.recipe.name,
                "recipe_fingerprint": fingerprint,
                "created": utc_now(),
                "status": "running",
                "strategy": self.recipe.strategy.name,
                "versions": library_versions(),
                "tasks": [{"name": task.name, "status": "pending"} for task in self.recipe.tasks],
            }
            atomic_write_text(
                self.rundir.root / "recipe.yaml", yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)
            )
            self.rundir.write_manifest(manifest)
            drop_previous(self.rundir.root)  # the new run has started: the replaced one goes
        self.distributed.wait_for_everyone()
        if manifest is None:
            manifest = self.rundir.read_manifest()
        if self.is_main:
            recover_dir(self.rundir.state)
            clean_staging(self.rundir.root, manifest)  # staging folders a killed run left behind
        self.distributed.wait_for_everyone()
        return manifest

    # ------------------------------------------------------------------ evaluation
    def _evaluate(
        self, model, tokenizer, task: TaskSpec, data, desc: str, row: int | str, outcome_name: str | None = None
    ) -> float:
        """θ's score on ``task``; its per-example outcomes go to ``eval/<row>_<task>.jsonl``
        (row 0 = base, t = after task t, ``expert`` = E_t; ``outcome_name`` in place of the
        task's name) for reports and study statistics."""
        from cpt.evaluation import evaluate_choice, evaluate_generation
        from cpt.evaluation.outcomes import outcomes_path, write_outcomes

        settings = self.recipe.evaluation
        # Evaluation runs on the main process alone with a whole model: with a ZeRO-3 config
        # registered, generate() would otherwise wait for the other ranks (synced_gpus).
        with no_zero3_init():
            if data.eval_kind == "choice":
                result = evaluate_choice(
                    model,
                    tokenizer,
                    data.eval_examples,
                    batch_size=settings.batch_size,
                    length_normalize=task.eval.length_normalize,
                    desc=desc,
                )
            else:
                result = evaluate_generation(
                    model,
                    tokenizer,
                    data.eval_examples,
                    batch_size=settings.batch_size,
                    max_new_tokens=task.eval.max_new_tokens or settings.max_new_tokens,
                    normalization=task.eval.normalize.model_dump(),
                    desc=desc,
                )
        write_outcomes(outcomes_path(self.rundir.root / "eval", row, outcome_name or task.name), result)
        return float(result.score)

    def _evaluate_row(self, model, tokenizer, task_data, label: str, row: int) -> list[float | None]:
        """Row ``row`` of R: a score per task, ``None`` for a task ``evaluation.rows`` skips."""
        scored = self._scored_tasks(row)
        return [
            self._evaluate(model, tokenizer, task, data, desc=f"eval {label} on {task.name}", row=row)
            if step in scored
            else None
            for step, (task, data) in enumerate(zip(self.recipe.tasks, task_data), start=1)
        ]

    def _scored_tasks(self, row: int) -> set[int]:
        """The tasks (numbered from 1) scored in row ``row``: every task, or with ``evaluation.rows: needed`` the
        entries METHOD §5's metrics read (:func:`cpt.evaluation.needed_entries`); the manifest then says so."""
        num_tasks = len(self.recipe.tasks)
        if self.recipe.evaluation.rows == "all":
            return set(range(1, num_tasks + 1))
        from cpt.evaluation import needed_entries

        self.manifest["evaluation_rows"] = "needed"  # sticky: some row of this run skips entries
        return set(needed_entries(num_tasks)[row])

    def _check_evaluation_rows(self) -> None:
        """``evaluation.rows`` is outside the fingerprint (every entry a metric reads is scored either way): a run
        may resume with the other value. Rows scored with ``needed`` before keep their skipped (null) entries."""
        unfinished = any(task["status"] != "done" for task in self.manifest["tasks"])
        if self.recipe.evaluation.rows == "all" and self.manifest.get("evaluation_rows") == "needed" and unfinished:
            log(
                "note: rows evaluated before this resume used evaluation.rows: needed; their skipped entries stay "
                "null (the states they need are gone); the metrics are unaffected"
            )

    def _save_matrix(self, matrix: dict) -> None:
        from cpt.evaluation import continual_metrics

        rows = present_rows(matrix)
        matrix["metrics"] = continual_metrics(rows, matrix["expert_scores"]) if rows else {}
        atomic_write_json(self.rundir.matrix_path, matrix)

    def _divergence_monitors(self) -> list:
        from cpt.training.divergence import DivergenceMonitor

        monitor = DivergenceMonitor.from_spec(self.recipe.divergence)
        return [monitor] if monitor is not None else []

    # ------------------------------------------------------------------ one task's callbacks
    def _integration_callback(self, step: int, task: TaskSpec, strategy, previous_state: Path | None):
        from cpt.callbacks import IntegrationCallback

        return IntegrationCallback(
            strategy,
            state_dir=self.rundir.state,
            # Strategies whose state is the expert never read θ0's tensors: no download for them.
            base=self.models.base_folder(self.base) if not self.strategy_info.state_is_expert else self.base,
            step=step,
            task_name=task.name,
            previous_state_dir=previous_state,
            history_dir=self.rundir.history,
            targets=self.recipe.targets,
            train_from=self.train_from,
            tokenizer=self.tokenizer,
            output_dir=self.rundir.integration,  # <t>_<task>.json
            max_shard_size=self.recipe.max_shard_size,
            adapter_dir=self.rundir.root / "experts",  # LoRA runs keep each task's adapter (<t>_<task>/)
        )

    def _geometry_callbacks(self, step: int, task: TaskSpec, previous_state: Path | None) -> list:
        geometry = self.recipe.geometry
        if not geometry.enabled:
            return []
        from cpt.callbacks import GeometryConflictCallback
        from cpt.diagnostics import GeometrySettings

        return [
            GeometryConflictCallback(
                base=self.models.base_folder(self.base),
                output_dir=self.rundir.geometry,
                step=step,
                task_name=task.name,
                state_dir=self.rundir.state,
                previous_state_dir=previous_state,
                train_from=self.train_from,
                targets=self.recipe.targets,
                settings=GeometrySettings(geometry.rank, geometry.energy, geometry.eps, geometry.eig_floor),
                keep_updates=geometry.keep_updates,
                top_k=geometry.top_k,
            )
        ]

    # ------------------------------------------------------------------ one task's training and record
    def _trainer_checkpoints(self, task: TaskSpec) -> list[Path]:
        """The trainer checkpoints of an interrupted task (resumed from the last); a fresh
        start of the task removes any stale trainer output first."""
        work = self.rundir.work(task.name)
        checkpoints = (
            sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) if work.exists() else []
        )
        if not checkpoints and work.exists() and self.is_main:
            shutil.rmtree(work)
        self.distributed.wait_for_everyone()
        return checkpoints

    def _train(
        self,
        trainer,
        step: int,
        task: TaskSpec,
        record: dict,
        checkpoints: list[Path],
        stopwatch: Stopwatch,
        *,
        train_dataset,
        cacheable: bool,
    ) -> None:
        """``trainer.train()``; its end runs the expert evaluation, geometry and integration callbacks."""
        record["status"] = "training"
        record["started"] = utc_now()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        if self.is_main:
            self.rundir.write_manifest(self.manifest)
        stopwatch.start()
        try:
            # Expert cache (cpt/study/expert_cache.py, METHOD §6): an expert trained from θ0 is trained once per
            # content key and reused; otherwise (or on a miss) this is trainer.train(resume_from_checkpoint=...).
            from cpt.study.expert_cache import train_or_reuse_expert

            train_or_reuse_expert(
                trainer,
                recipe=self.recipe,
                train_dataset=train_dataset,  # as cpt handed it to the trainer (hashed into the key)
                base_folder=lambda: self.models.base_folder(self.base),
                train_from=self.train_from,
                cacheable=cacheable,
                record=record,
                label=task.name,
                resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None,
                cache=self.expert_cache,
            )
        except CptError as exc:
            record["status"] = "failed"
            record["error"] = str(exc)
            if self.is_main:
                self.rundir.write_manifest(self.manifest)
            raise type(exc)(f"task {step} ({task.name}): {exc}") from None

    def _record_trained(self, record: dict, state, stopwatch: Stopwatch) -> None:
        """At ``on_train_end``, before integration: the task is trained (time, final loss)."""
        record["status"] = "trained"
        record["train_seconds"] = round(stopwatch.seconds(), 3)
        record[STEPS_KEY] = state.global_step  # the trackers' step offset of the tasks after it (cpt.trackers)
        if state.log_history:
            losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
            record["final_loss"] = losses[-1] if losses else None
        if state.is_world_process_zero:
            self.rundir.write_manifest(self.manifest)

    def _record_integrated(self, record: dict, integration, diagnostics: list, task: TaskSpec) -> None:
        record["status"] = "integrated"
        record["integration_seconds"] = round(integration.seconds or 0.0, 3)
        if self.merge_cache is not None:  # this task's share of the shared GCWM merges (cpt.study)
            counts = self.merge_cache.counts()
            record["gcwm_merge_cache"] = {
                name: round(value - self._merge_cache_counted[name], 3) for name, value in counts.items()
            }
            self._merge_cache_counted = counts
        if self.is_main:
            self.rundir.write_manifest(self.manifest)
            shutil.rmtree(self.rundir.work(task.name), ignore_errors=True)  # checkpoints are only needed mid-task
        if diagnostics and diagnostics[0].report is not None:
            record["geometry_conflict_mean"] = diagnostics[0].report["aggregates"]["geometry_conflict"]["mean"]
            record["geometry_seconds"] = diagnostics[0].report["seconds"]

    # ------------------------------------------------------------------ evaluation of the base, experts, states
    def _evaluate_base(self) -> None:
        from transformers import set_seed

        if self.is_main:
            set_seed(self.recipe.seed)
            model = self.models.load_eval_model(self.base)
            started = time.perf_counter()
            self.matrix["rows"][0] = self._evaluate_row(model, self.tokenizer, self.task_data, "base", row=0)
            self._evaluate_probes(model, "base", row=0)
            self.manifest["base_eval_seconds"] = round(time.perf_counter() - started, 3)
            self._save_matrix(self.matrix)
            self.rundir.write_manifest(self.manifest)
            log("base: " + _scores_text(self.task_names, self.matrix["rows"][0]))
            del model
        self.distributed.wait_for_everyone()

    def _score_expert(self, step: int, task: TaskSpec, data, expert) -> None:
        """E_t on its own task (main process, at the end of its training)."""
        self.matrix["expert_scores"][step - 1] = self._evaluate(
            expert, self.tokenizer, task, data, desc=f"eval expert {task.name}", row="expert"
        )
        self._save_matrix(self.matrix)

    def _evaluate_state(self, step: int, task: TaskSpec, model) -> None:
        """Row t of the accuracy matrix: θ_t on every task (main process); then the task is done."""
        from transformers import set_seed

        record = self.manifest["tasks"][step - 1]
        if model is None:
            set_seed(self.recipe.seed)
            model = self.models.load_eval_model(str(self.rundir.state))
        started = time.perf_counter()
        self.matrix["rows"][step] = self._evaluate_row(
            model, self.tokenizer, self.task_data, f"after {task.name}", row=step
        )
        self._evaluate_probes(model, f"after {task.name}", row=step)
        record["eval_seconds"] = round(time.perf_counter() - started, 3)
        record.update(_peak_memory())  # of the main process (it also evaluates)
        record["status"] = "done"
        record["finished"] = utc_now()
        self._save_matrix(self.matrix)
        self.rundir.write_manifest(self.manifest)
        self._summarise(step, task, record, self.matrix)
        self._log_matrix_row(step)

    def _write_report(self) -> None:
        try:  # a report problem never fails a finished run; `cpt report RUN_DIR` redoes it
            from cpt.report import write_report

            log(f"report: {write_report(self.rundir.root)}")
        except Exception as exc:  # noqa: BLE001
            log(
                f"warning: no report written ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                f"try `cpt report {self.rundir.root}`"
            )

    def _summarise(self, step: int, task: TaskSpec, record: dict, matrix: dict) -> None:
        row = matrix["rows"][step]
        expert = matrix["expert_scores"][step - 1]
        scores = _scores_text(matrix["tasks"], row)
        timing = (
            f"train {record.get('train_seconds', 0):.0f}s, integrate {record.get('integration_seconds', 0):.1f}s, "
            f"eval {record.get('eval_seconds', 0):.0f}s"
        )
        expert_text = f"expert {expert:.3f}; " if expert is not None else ""
        log(f"task {step}/{len(self.recipe.tasks)} {task.name} done: {expert_text}state {scores} ({timing})")

    # ------------------------------------------------------------------ probes (eval-only tasks)
    def _build_probe_data(self) -> list:
        from cpt.data import build_probe_data

        return build_probe_data(self.recipe.probes, self.recipe.seed)

    def _evaluate_probes(self, model, label: str, row: int) -> None:
        """Row ``row`` of the probe columns (main process); outcomes to ``eval/<row>_probe-<name>.jsonl``."""
        if not self.recipe.probes:
            return
        scores = []
        for index, (probe, data) in enumerate(zip(self.recipe.probes, self.probe_data)):
            desc = f"eval {label} on probe {probe.name}"
            if probe.lm_eval is not None:
                from cpt.evaluation.lm_eval_probe import evaluate_lm_eval
                from cpt.evaluation.outcomes import outcomes_path

                with no_zero3_init():
                    score = evaluate_lm_eval(
                        model,
                        self.tokenizer,
                        probe.lm_eval,
                        batch_size=self.recipe.evaluation.batch_size,
                        outcomes_file=outcomes_path(self.rundir.root / "eval", row, f"probe-{probe.name}"),
                        where=f"probes[{index}].lm_eval",
                    )
            else:
                score = self._evaluate(
                    model, self.tokenizer, probe, data, desc, row, outcome_name=f"probe-{probe.name}"
                )
            scores.append(score)
        self.matrix["probe_rows"][row] = scores
        log(f"probes {label}: " + "  ".join(f"{p.name}={x:.3f}" for p, x in zip(self.recipe.probes, scores)))

    def _evaluate_base_probes(self) -> None:
        if self.is_main:
            model = self.models.load_eval_model(self.base)
            self._evaluate_probes(model, "base", row=0)
            self._save_matrix(self.matrix)
            del model
        self.distributed.wait_for_everyone()

    def _general_ability(self, matrix: dict) -> dict | None:
        """General ability kept (probe after the last task / base), or ``None`` for a run without probes."""
        from cpt.evaluation import general_ability_kept

        if not matrix.get("probes"):
            return None
        return general_ability_kept(matrix["probe_rows"], matrix["probes"])

    # ------------------------------------------------------------------ trackers (training.report_to)
    def _log_matrix_row(self, step: int) -> None:
        """Row ``step`` of the accuracy matrix (and, at step 1, the base row 0) to the ``report_to`` trackers,
        main process only, at the sequence step where task ``step`` ended (:meth:`_sequence_step`; the base
        row at 0; README, "Metrics sent to trackers").

        Keys are ``eval_<task>``, ``eval_probe-<probe>``, ``eval_acc``/``bwt``/``fwt``/``forgetting`` and
        ``eval_general_ability_kept`` (mean; ``/<probe>`` per probe): transformers' trackers show them as
        ``eval/<name>`` (TensorBoard, W&B, trackio, ...), as they show ``trainer.log``'s ``eval_`` keys.
        """
        if not self.is_main or not self._tracker_callbacks():
            return
        if step == 1 and self.matrix["rows"][0] is not None:
            self._log_to_trackers(self._matrix_row_metrics(0), 0)
        self._log_to_trackers(self._matrix_row_metrics(step), self._sequence_step(step))

    def _sequence_step(self, tasks: int) -> int:
        """The optimizer steps of tasks 1 … ``tasks`` from the manifest (:func:`cpt.trackers.sequence_step`):
        the tracker step where task ``tasks`` ended and task ``tasks`` + 1's steps start (resumes included)."""
        max_steps = [self.recipe.training_args(task).get("max_steps") for task in self.recipe.tasks[:tasks]]
        return sequence_step(self.manifest["tasks"][:tasks], max_steps)

    def _matrix_row_metrics(self, row: int) -> dict[str, float]:
        matrix = self.matrix
        metrics = {f"eval_{name}": score for name, score in zip(matrix["tasks"], matrix["rows"][row] or [])}
        probe_row = (matrix.get("probe_rows") or [None] * (row + 1))[row]
        metrics.update({f"eval_probe-{name}": score for name, score in zip(matrix.get("probes", []), probe_row or [])})
        if row >= 1:
            from cpt.evaluation import continual_metrics, general_ability_kept

            continual = continual_metrics(present_rows({**matrix, "rows": matrix["rows"][: row + 1]}))
            metrics.update({f"eval_{key}": continual[key] for key in ("acc", "bwt", "fwt", "forgetting")})
            if matrix.get("probes"):
                kept = general_ability_kept(matrix["probe_rows"][: row + 1], matrix["probes"])
                metrics["eval_general_ability_kept"] = kept["mean"]
                metrics.update({f"eval_general_ability_kept/{k}": v for k, v in kept["per_probe"].items()})
        return {key: float(value) for key, value in metrics.items() if value is not None}

    def _tracker_callbacks(self) -> list:
        """The recipe's ``report_to`` integrations as transformers callbacks, made once per run.

        The matrix rows are written after each task's trainer is released, so the runner keeps
        its own instances; TensorBoard writes to ``<logging_dir>`` = ``$TENSORBOARD_LOGGING_DIR``
        or ``<run dir>/tensorboard`` (where :meth:`_point_trackers` sends the trainers' logs too).
        """
        if getattr(self, "_trackers", None) is None:
            from transformers.integrations import get_reporting_integration_callbacks

            report_to = self.recipe.training_args(self.recipe.tasks[0]).get("report_to", "none")
            self._trackers = [callback() for callback in get_reporting_integration_callbacks(report_to)]
            self._point_trackers(self._trackers)
        return self._trackers

    def _point_trackers(self, callbacks: list) -> None:
        """TensorBoard callbacks log under the run directory (a task's trainer output folder is removed)."""
        from transformers.integrations import TensorBoardCallback

        for callback in callbacks:
            if isinstance(callback, TensorBoardCallback) and getattr(callback, "logging_dir", None) is None:
                callback.logging_dir = str(self.rundir.root / "tensorboard")

    def _log_to_trackers(self, metrics: dict[str, float], step: int) -> None:
        from transformers import TrainerControl, TrainerState
        from trl import SFTConfig

        state = TrainerState(global_step=step, is_world_process_zero=self.is_main, is_local_process_zero=self.is_main)
        args = SFTConfig(output_dir=str(self.rundir.root), **self.recipe.training_args(self.recipe.tasks[0]))
        for callback in self._trackers:
            callback.on_log(args, state, TrainerControl(), logs=dict(metrics))

    def _close_trackers(self) -> None:
        from transformers import TrainerControl, TrainerState

        for callback in getattr(self, "_trackers", None) or []:
            if hasattr(callback, "tb_writer"):  # TensorBoard: flush and close its event file
                callback.on_train_end(None, TrainerState(), TrainerControl())
