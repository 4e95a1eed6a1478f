"""The task loop: train an expert per task, integrate it, evaluate the state on every task.

The run directory (DESIGN.md) is the only state. A run killed at any moment and started
again with the same command continues from the last completed task:

* ``manifest.json`` marks a task ``done`` only after its evaluation row is saved;
* ``state/`` is replaced atomically and records the step it holds (``cpt_state.json``),
  so a kill after integration but before evaluation resumes at evaluation;
* a kill during training retrains the task from the previous state with the same seed
  (or from the trainer's last checkpoint when the recipe saves checkpoints).
"""

from __future__ import annotations

import gc
import importlib.metadata
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from cpt.errors import CptError
from cpt.io import atomic_write_json, atomic_write_text, read_json, recover_dir
from cpt.recipe import Recipe, TaskSpec
from cpt.tensors import is_zero3, no_zero3_init, read_marker, release_deepspeed_engine, save_model_folder

MANIFEST_FORMAT = 1
VERSIONED_PACKAGES = ("cpt", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "evaluate", "deepspeed")


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def present_rows(matrix: dict) -> list[list[float | None]]:
    """Rows 0..k of the accuracy matrix, k the last evaluated step; a skipped row (e.g. the
    base with ``evaluate_base: false``) stays in place as Nones so indices keep their meaning."""
    rows = matrix["rows"]
    last = max((i for i, row in enumerate(rows) if row is not None), default=-1)
    width = len(matrix["tasks"])
    return [row if row is not None else [None] * width for row in rows[: last + 1]]


def log(message: str) -> None:
    print(f"[cpt] {message}", file=sys.stderr, flush=True)


class RunDirectory:
    """Paths and atomic records of ``runs/<name>/``."""

    def __init__(self, root: Path):
        self.root = root
        self.state = root / "state"
        self.manifest_path = root / "manifest.json"
        self.matrix_path = root / "eval" / "matrix.json"
        self.geometry = root / "geometry"
        self.history = root / "history"
        self.integration = root / "integration"

    def work(self, task: str) -> Path:
        return self.root / "work" / task

    def read_manifest(self) -> dict | None:
        return read_json(self.manifest_path)

    def write_manifest(self, manifest: dict) -> None:
        manifest["updated"] = _now()
        atomic_write_json(self.manifest_path, manifest)


def _peak_memory() -> dict[str, float]:
    """This process's peak resident memory so far, and its peak CUDA allocation since the task began (GiB)."""
    import resource

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"peak_host_rss_gib": round(max_rss / (2**30 if sys.platform == "darwin" else 2**20), 3)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return peak


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunResult:
    run_dir: Path
    matrix: list[list[float]]
    expert_scores: list[float | None]
    metrics: dict[str, Any]
    task_names: list[str]


class TaskSequenceRunner:
    """Runs a recipe's task sequence in its run directory (see module docstring)."""

    def __init__(self, recipe: Recipe, *, overwrite: bool = False):
        from accelerate import PartialState

        self.recipe = recipe
        self.rundir = RunDirectory(recipe.run_dir)
        self.overwrite = overwrite
        self.distributed = PartialState()
        self.is_main = self.distributed.is_main_process

    # ------------------------------------------------------------------ set-up
    def _prepare_run_dir(self) -> dict:
        manifest = self.rundir.read_manifest()
        fingerprint = self.recipe.fingerprint()
        if manifest is not None and manifest.get("recipe_fingerprint") != fingerprint:
            if not self.overwrite:
                raise CptError(
                    f"{self.rundir.root} holds a run of a different recipe (fingerprint {manifest.get('recipe_fingerprint')} != {fingerprint}); "
                    "pass --overwrite to start it again, or change 'name' or 'output_dir'"
                )
            manifest = None
        if manifest is None and self.is_main:
            if self.rundir.root.exists() and any(self.rundir.root.iterdir()):
                if not self.overwrite and not (self.rundir.root / "manifest.json").exists():
                    raise CptError(f"{self.rundir.root} exists and is not a cpt run directory; pass --overwrite to replace it or choose another 'name'")
                shutil.rmtree(self.rundir.root)
            self.rundir.root.mkdir(parents=True, exist_ok=True)
            manifest = {
                "format": MANIFEST_FORMAT,
                "run_name": self.recipe.name,
                "recipe_fingerprint": fingerprint,
                "created": _now(),
                "status": "running",
                "strategy": self.recipe.strategy.name,
                "versions": library_versions(),
                "tasks": [{"name": task.name, "status": "pending"} for task in self.recipe.tasks],
            }
            atomic_write_text(self.rundir.root / "recipe.yaml", yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False))
            self.rundir.write_manifest(manifest)
        self.distributed.wait_for_everyone()
        if manifest is None:
            manifest = self.rundir.read_manifest()
        if self.is_main:
            recover_dir(self.rundir.state)
        self.distributed.wait_for_everyone()
        return manifest

    def _load_eval_model(self, path: str):
        """A whole (never ZeRO-3 partitioned) model for evaluation on the main process."""
        with no_zero3_init():
            return self._load_model(path)

    def _load_model(self, path: str):
        from transformers import AutoModelForCausalLM

        spec = self.recipe.model
        dtype = "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code, "use_safetensors": True}
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        if path == spec.name_or_path and spec.revision:
            kwargs["revision"] = spec.revision
        try:
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as exc:
            raise CptError(f"model.name_or_path: cannot load {path!r} ({str(exc).splitlines()[0]}); use a local HF folder or an offline asset (`cpt assets list`)") from None

    def _load_tokenizer(self, path: str):
        from transformers import AutoTokenizer

        spec = self.recipe.model
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
        except OSError as exc:
            raise CptError(f"model.name_or_path: cannot load a tokenizer from {path!r} ({str(exc).splitlines()[0]})") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _resolve_base(self) -> str:
        from cpt.assets import resolve_model

        name = self.recipe.model.name_or_path
        if self.is_main:
            resolve_model(name)  # the main process fetches; the others then find it cached
        self.distributed.wait_for_everyone()
        return resolve_model(name)

    def _base_folder(self, base: str) -> Path:
        """A local folder of θ0 (merge strategies and geometry read it tensor by tensor)."""
        if Path(base).is_dir():
            return Path(base)
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(base, revision=self.recipe.model.revision, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as exc:
            raise CptError(f"model.name_or_path: cannot download {base!r} ({type(exc).__name__}); use a local folder or an asset") from None

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, model, tokenizer, task: TaskSpec, data, desc: str) -> float:
        from cpt.evaluation import evaluate_choice, evaluate_generation

        settings = self.recipe.evaluation
        # Evaluation runs on the main process alone with a whole model: with a ZeRO-3 config
        # registered, generate() would otherwise wait for the other ranks (synced_gpus).
        with no_zero3_init():
            if data.eval_kind == "choice":
                result = evaluate_choice(
                    model, tokenizer, data.eval_examples, batch_size=settings.batch_size,
                    length_normalize=task.eval.length_normalize, desc=desc,
                )
            else:
                result = evaluate_generation(
                    model, tokenizer, data.eval_examples, batch_size=settings.batch_size,
                    max_new_tokens=task.eval.max_new_tokens or settings.max_new_tokens,
                    normalization=task.eval.normalize.model_dump(), desc=desc,
                )
        return float(result.score)

    def _evaluate_row(self, model, tokenizer, task_data, label: str) -> list[float]:
        return [
            self._evaluate(model, tokenizer, task, data, desc=f"eval {label} on {task.name}")
            for task, data in zip(self.recipe.tasks, task_data)
        ]

    def _save_matrix(self, matrix: dict) -> None:
        from cpt.evaluation import continual_metrics

        rows = present_rows(matrix)
        matrix["metrics"] = continual_metrics(rows, matrix["expert_scores"]) if rows else {}
        atomic_write_json(self.rundir.matrix_path, matrix)

    # ------------------------------------------------------------------ the loop
    def run(self) -> RunResult:
        from transformers import set_seed

        from cpt.data import build_task_data
        from cpt.evaluation import continual_metrics, format_matrix_table
        from cpt.strategies import get_strategy

        recipe = self.recipe
        manifest = self._prepare_run_dir()
        strategy = get_strategy(recipe.strategy.name)
        train_from = recipe.strategy.train_from or strategy.train_from
        base = self._resolve_base()
        tokenizer = self._load_tokenizer(base)
        task_names = [task.name for task in recipe.tasks]
        num_tasks = len(task_names)

        log(f"run {recipe.name} → {self.rundir.root} ({num_tasks} tasks, strategy {strategy.name}, experts from {train_from})")
        task_data = [build_task_data(task, index, recipe.seed) for index, task in enumerate(recipe.tasks)]
        for index, data in enumerate(task_data):
            manifest["tasks"][index].update(train_examples=len(data.train), eval_examples=len(data.eval_examples))

        matrix = read_json(self.rundir.matrix_path) or {
            "tasks": task_names,
            "rows": [None] * (num_tasks + 1),
            "expert_scores": [None] * num_tasks,
        }
        if matrix["rows"][0] is None and recipe.evaluation.evaluate_base:
            if self.is_main:
                set_seed(recipe.seed)
                model = self._load_eval_model(base)
                started = time.perf_counter()
                matrix["rows"][0] = self._evaluate_row(model, tokenizer, task_data, "base")
                manifest["base_eval_seconds"] = round(time.perf_counter() - started, 3)
                self._save_matrix(matrix)
                self.rundir.write_manifest(manifest)
                log("base: " + "  ".join(f"{name}={score:.3f}" for name, score in zip(task_names, matrix["rows"][0])))
                del model
            self.distributed.wait_for_everyone()

        for step, (task, data) in enumerate(zip(recipe.tasks, task_data), start=1):
            record = manifest["tasks"][step - 1]
            if record["status"] == "done":
                continue
            marker = read_marker(self.rundir.state) if self.rundir.state.exists() else None
            held_step = marker["step"] if marker else 0
            if held_step not in (step - 1, step):
                raise CptError(f"{self.rundir.state} holds step {held_step} but task {step} is next; the run directory is inconsistent: rerun with --overwrite")
            previous_state = self.rundir.state if step > 1 else None
            if held_step == step - 1:
                self._train_and_integrate(step, task, data, base, tokenizer, strategy, train_from, previous_state, manifest, matrix)
                model_for_eval = self._live_state
            else:
                log(f"task {step}/{num_tasks} {task.name}: integrated before the interruption; evaluating")
                model_for_eval = None

            if self.is_main:
                if model_for_eval is None:
                    set_seed(recipe.seed)
                    model_for_eval = self._load_eval_model(str(self.rundir.state))
                started = time.perf_counter()
                matrix["rows"][step] = self._evaluate_row(model_for_eval, tokenizer, task_data, f"after {task.name}")
                record["eval_seconds"] = round(time.perf_counter() - started, 3)
                record.update(_peak_memory())  # of the main process (it also evaluates)
                record["status"] = "done"
                record["finished"] = _now()
                self._save_matrix(matrix)
                self.rundir.write_manifest(manifest)
                self._summarise(step, task, record, matrix)
            self._live_state = None
            del model_for_eval
            gc.collect()
            self.distributed.wait_for_everyone()

        if not self.is_main:  # the main process evaluated and saved everything
            matrix = read_json(self.rundir.matrix_path)
        rows = present_rows(matrix)
        metrics = continual_metrics(rows, matrix["expert_scores"])
        if self.is_main:
            manifest["status"] = "complete"
            manifest["metrics"] = metrics
            self.rundir.write_manifest(manifest)
            print(format_matrix_table(rows, task_names, matrix["expert_scores"], metrics))
            print(f"run directory: {self.rundir.root}")
            try:  # a report problem never fails a finished run; `cpt report RUN_DIR` redoes it
                from cpt.report import write_report

                log(f"report: {write_report(self.rundir.root)}")
            except Exception as exc:  # noqa: BLE001
                log(f"warning: no report written ({type(exc).__name__}: {' '.join(str(exc).split())}); try `cpt report {self.rundir.root}`")
        return RunResult(self.rundir.root, matrix["rows"], matrix["expert_scores"], metrics, task_names)

    _live_state = None

    def _train_and_integrate(self, step, task, data, base, tokenizer, strategy, train_from, previous_state, manifest, matrix) -> None:
        from transformers import TrainerCallback, set_seed
        from trl import SFTConfig

        from callbacks import IntegrationCallback
        from cpt.integration import TaskContext
        from cpt.training.trainer import CptSFTTrainer

        recipe = self.recipe
        num_tasks = len(recipe.tasks)
        record = manifest["tasks"][step - 1]
        start_from = str(previous_state) if (train_from == "state" and previous_state is not None) else base
        log(f"task {step}/{num_tasks} {task.name}: training on {len(data.train)} task examples from {'θ_{t-1}' if start_from != base else 'θ0'}")

        work = self.rundir.work(task.name)
        checkpoints = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) if work.exists() else []
        if not checkpoints and work.exists() and self.is_main:
            shutil.rmtree(work)  # a fresh start of this task: no stale trainer output
        self.distributed.wait_for_everyone()

        # Same seed for the same task whether or not the run was interrupted before it.
        # The SFTConfig comes first: with DeepSpeed ZeRO-3 and zero3_init_flag it makes
        # from_pretrained partition the weights while loading.
        args = SFTConfig(output_dir=str(work), seed=recipe.seed + step, **recipe.training_args(task))
        set_seed(recipe.seed + step)
        model = self._load_model(start_from)
        peft_config = None
        if recipe.peft is not None:
            from peft import LoraConfig

            peft_config = LoraConfig(task_type="CAUSAL_LM", **recipe.peft.model_dump())

        runner = self

        class ExpertEvaluation(TrainerCallback):
            """Scores E_t on its own task before integration replaces it (runner-internal)."""

            def on_train_end(self, args, state, control, model=None, **kwargs):
                if is_zero3(model):
                    # ZeRO-3: gather the expert once, module by module, into a folder that
                    # evaluation, geometry and integration then read (no rank holds it all).
                    expert_dir = work / "expert"
                    save_model_folder(model, None, expert_dir)
                    for callback in (*diagnostics, integration):
                        callback.expert_dir = expert_dir
                    if state.is_world_process_zero and recipe.evaluation.evaluate_experts:
                        model = runner._load_eval_model(str(expert_dir))
                if state.is_world_process_zero and recipe.evaluation.evaluate_experts:
                    score = runner._evaluate(model, tokenizer, task, data, desc=f"eval expert {task.name}")
                    matrix["expert_scores"][step - 1] = score
                    runner._save_matrix(matrix)
                record["status"] = "trained"
                record["train_seconds"] = round(time.perf_counter() - train_started, 3)
                if state.log_history:
                    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
                    record["final_loss"] = losses[-1] if losses else None
                if state.is_world_process_zero:
                    runner.rundir.write_manifest(manifest)

        integrator = strategy.build(recipe.strategy.params)
        task_context = TaskContext(
            step=step, task_name=task.name, task_names=[t.name for t in recipe.tasks], train_dataset=data.train,
            strategy_dir=self.rundir.root / "strategy", seed=recipe.seed,
        )
        train_dataset = integrator.prepare_train_dataset(task_context) if hasattr(integrator, "prepare_train_dataset") else data.train
        strategy_callbacks = integrator.training_callbacks(task_context) if hasattr(integrator, "training_callbacks") else []
        integration = IntegrationCallback(
            integrator,
            state_dir=self.rundir.state,
            base_dir=self._base_folder(base) if not strategy.state_is_expert else Path(base),
            step=step,
            task_name=task.name,
            previous_state_dir=previous_state,
            history_dir=self.rundir.history,
            targets=recipe.targets,
            train_from=train_from,
            tokenizer=tokenizer,
            stats_path=self.rundir.integration / f"{step}_{task.name}.json",
        )
        diagnostics = []
        if recipe.geometry.enabled:
            from callbacks import GeometryConflictCallback
            from cpt.diagnostics import GeometrySettings

            geometry = recipe.geometry
            diagnostics.append(GeometryConflictCallback(
                base_dir=self._base_folder(base), output_dir=self.rundir.geometry, step=step, task_name=task.name,
                state_dir=previous_state, update_from=train_from, targets=recipe.targets,
                settings=GeometrySettings(geometry.rank, geometry.energy, geometry.eps, geometry.eig_floor),
                keep_updates=geometry.keep_updates, top_k=geometry.top_k,
            ))
        trainer = CptSFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[*strategy_callbacks, ExpertEvaluation(), *diagnostics, integration],
        )
        for callback in diagnostics:
            callback.bind_trainer(trainer)
        record["status"] = "training"
        record["started"] = _now()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        if self.is_main:
            self.rundir.write_manifest(manifest)
        train_started = time.perf_counter()
        try:
            # Expert cache (cpt/study/expert_cache.py, METHOD §6): an expert trained from θ0 is trained once per
            # content key and reused; otherwise (or on a miss) this is trainer.train(resume_from_checkpoint=...).
            from cpt.study.expert_cache import train_or_reuse_expert

            train_or_reuse_expert(
                trainer, recipe=recipe, train_dataset=train_dataset, base_folder=lambda: self._base_folder(base), train_from=train_from,
                cacheable=not strategy_callbacks and train_dataset is data.train, record=record, label=task.name,
                resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None, cache=getattr(self, "expert_cache", None),
            )
        except CptError as exc:
            record["status"] = "failed"
            record["error"] = str(exc)
            if self.is_main:
                self.rundir.write_manifest(manifest)
            raise type(exc)(f"task {step} ({task.name}): {exc}") from None
        record["status"] = "integrated"
        record["integration_seconds"] = round(integration.seconds or 0.0, 3)
        if self.is_main:
            self.rundir.write_manifest(manifest)
            shutil.rmtree(work, ignore_errors=True)  # trainer checkpoints are only needed mid-task
        if diagnostics and diagnostics[0].report is not None:
            record["geometry_conflict_mean"] = diagnostics[0].report["aggregates"]["geometry_conflict"]["mean"]
            record["geometry_seconds"] = diagnostics[0].report["seconds"]
        self._live_state = trainer.model if strategy.state_is_expert and not is_zero3(trainer.model) else None
        release_deepspeed_engine(trainer.accelerator)  # else every task's engine outlives it
        del trainer

    def _summarise(self, step: int, task: TaskSpec, record: dict, matrix: dict) -> None:
        row = matrix["rows"][step]
        expert = matrix["expert_scores"][step - 1]
        scores = "  ".join(f"{name}={score:.3f}" for name, score in zip(matrix["tasks"], row))
        timing = f"train {record.get('train_seconds', 0):.0f}s, integrate {record.get('integration_seconds', 0):.1f}s, eval {record.get('eval_seconds', 0):.0f}s"
        expert_text = f"expert {expert:.3f}; " if expert is not None else ""
        log(f"task {step}/{len(self.recipe.tasks)} {task.name} done: {expert_text}state {scores} ({timing})")
