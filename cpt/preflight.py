"""Preflight: check a whole recipe before anything in the run directory is created or changed.

``cpt check RECIPE`` runs :func:`check_recipe` and prints the plan; ``cpt run`` runs the same
checks first, so a broken recipe fails in seconds, with one line, and the run directory (and
any finished run in it) is left as it was. What is checked, in order:

1. the strategy and its parameters (already validated when the recipe loaded);
2. the model: the name resolves (assets are built on first use), ``config.json`` and the
   tokenizer load, safetensors weights are present — no weight is loaded; LoRA
   ``target_modules`` name modules of the model;
3. the strategy's requirements: merge strategies and the geometry diagnostics read the
   tensors that ``targets`` selects, so at least one 2-D tensor of the base must match;
4. every task's data: the training and eval sources load and every row renders through the
   field mapping (the first rendered prompt/completion is shown);
5. every task's training arguments: the real ``trl.SFTConfig`` is built from
   ``recipe.training_args(task)``, a batch of the task's first examples is tokenized the way
   ``SFTTrainer`` prepares its dataset and collated by its data collator;
6. the run directory: whether the run starts fresh, resumes (same recipe fingerprint), is
   already complete, or is refused (another recipe's run, or not a run directory, without
   ``--overwrite``).

Every problem raises :class:`~cpt.errors.CptError` naming the recipe field or file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpt.errors import CptError
from cpt.recipe import Recipe, TaskSpec

#: Examples tokenized and collated per task to check the training arguments.
COLLATE_EXAMPLES = 4


@dataclass
class TaskPlan:
    """What one task will do."""

    name: str
    train_examples: int
    eval_examples: int
    eval_kind: str
    optimizer_steps: int
    batch_tokens: tuple[int, int]
    """Shape (batch, sequence) of the collated check batch."""
    sample_prompt: str
    sample_completion: str


@dataclass
class RunPlan:
    """The outcome of :func:`check_recipe`: what ``cpt run`` would do with this recipe."""

    recipe: Recipe
    model_path: str
    strategy: str
    strategy_params: dict[str, Any]
    train_from: str
    run_dir: Path
    action: str
    """``fresh``, ``resume``, ``complete`` (nothing left to do) or ``overwrite``."""
    action_detail: str
    world_size: int = 1
    target_tensors: int | None = None
    tasks: list[TaskPlan] = field(default_factory=list)
    probes: list[tuple[str, str]] = field(default_factory=list)
    """(name, what is evaluated) per probe."""
    disk: tuple[int, int] | None = None
    """(bytes free where the run directory goes, bytes of one state), when the run has work left."""

    def format(self) -> str:
        """The plan as a few readable lines."""
        recipe = self.recipe
        params = ", ".join(f"{key}={value!r}" for key, value in self.strategy_params.items()) or "no parameters"
        lines = [
            f"recipe {recipe.name}: OK",
            f"model      {recipe.model.name_or_path}"
            + (f" → {self.model_path}" if self.model_path != recipe.model.name_or_path else ""),
            f"strategy   {self.strategy} (experts from {self.train_from}; {params})",
        ]
        if self.target_tensors is not None:
            lines.append(f"targets    {self.target_tensors} target tensors matched by {len(recipe.targets)} pattern(s)")
        lines.append(f"geometry   {'on' if recipe.geometry.enabled else 'off'}")
        lines.append(f"run dir    {self.run_dir}: {self.action_detail}")
        if self.disk is not None:
            free, state = self.disk
            lines.append(f"disk       {_gigabytes(free)} free; one state of this model is {_gigabytes(state)}")
        lines.append(f"tasks      {len(self.tasks)} (processes: {self.world_size})")
        width = max(len(task.name) for task in self.tasks)
        for index, task in enumerate(self.tasks, start=1):
            lines.append(
                f"  {index}. {task.name:{width}s}  train {task.train_examples:5d}  eval {task.eval_examples:4d} "
                f"({task.eval_kind})"
                f"  optimizer steps {task.optimizer_steps}"
            )
            lines.append(f"     prompt:     {task.sample_prompt}")
            lines.append(f"     completion: {task.sample_completion}")
        for name, what in self.probes:
            lines.append(f"  probe {name}: {what} (evaluated for the base and after every task, never trained)")
        return "\n".join(lines)


# ---------------------------------------------------------------------- disk
def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def state_bytes(recipe: Recipe, files: list[str], shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes of one saved state: every tensor at the recipe's load dtype (``auto``: as the checkpoint stores it)."""
    if recipe.model.dtype == "auto":
        return sum(os.path.getsize(file) for file in files)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[recipe.model.dtype]
    return itemsize * sum(math.prod(shape) for shape in shapes.values())


def check_disk_space_for(recipe: Recipe) -> tuple[int, int]:
    """:func:`check_disk_space` from the model's safetensors headers alone (no config, tokenizer or data)."""
    files = _safetensors_files(resolve_model_path(recipe), recipe.model.revision)
    return check_disk_space(recipe, files, _tensor_shapes(files))


def check_disk_space(recipe: Recipe, files: list[str], shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """Refuse a run whose disk cannot hold two states — the state and the next one, staged beside it before it
    replaces it (``cpt.recovery``) — the least any integration writes; return (bytes free, bytes of a state)."""
    import shutil

    state = state_bytes(recipe, files, shapes)
    where = Path(recipe.run_dir).absolute()
    while not where.exists():  # the run directory (and its parents) may not exist yet
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < 2 * state:
        raise CptError(
            f"output_dir: {_gigabytes(free)} free on the disk of {where}, but a run of this model stages each new "
            f"state ({_gigabytes(state)}) beside the last one: free at least {_gigabytes(2 * state - free)} "
            "(`cpt cache info` shows the expert cache) or choose another output_dir"
        )
    return free, state


# ---------------------------------------------------------------------- model
def resolve_model_path(recipe: Recipe) -> str:
    """The model's local folder (assets built on first use) or its hub id."""
    from cpt.assets import resolve_model

    return resolve_model(recipe.model.name_or_path)


def check_model(recipe: Recipe, path: str) -> tuple[Any, list[str], dict[str, tuple[int, ...]]]:
    """Load config and tokenizer, find the safetensors weights; return (tokenizer, files, shapes).

    ``shapes`` maps every tensor name to its shape, read from the safetensors headers only.
    """
    from transformers import AutoConfig, AutoTokenizer

    spec = recipe.model
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CptError(
            f"model.name_or_path: {path!r} is a file; give a Hugging Face model folder (config.json, *.safetensors, "
            f"tokenizer files)"
        )
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise CptError(
            f"model.name_or_path: {path!r} has no config.json; give a Hugging Face model folder (config.json, "
            f"*.safetensors, tokenizer files)"
        )
    if not folder.exists() and (path.startswith((".", "~")) or folder.is_absolute() or path.count("/") > 1):
        raise CptError(
            f"model.name_or_path: folder {path!r} not found (relative paths are taken from the current directory)"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision and not folder.is_dir():
        kwargs["revision"] = spec.revision
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as exc:  # OSError, ValueError (unknown model_type), JSON errors...
        raise CptError(
            f"model.name_or_path: cannot load the config of {path!r} ({_first_line(exc)}); use a local HF folder or an "
            f"offline asset (`cpt assets list`)"
        ) from None
    check_model_build(recipe, config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise CptError(f"model.name_or_path: cannot load a tokenizer from {path!r} ({_first_line(exc)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise CptError(f"model.name_or_path: the tokenizer of {path!r} has neither a pad nor an eos token")
    files = _safetensors_files(path, spec.revision)
    return tokenizer, files, _tensor_shapes(files)


def check_model_build(recipe: Recipe, config) -> None:
    """Build the model on the meta device (no memory, no weights) with the recipe's dtype and attention."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = recipe.model
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.dtype != "auto":
        kwargs["dtype"] = getattr(torch, spec.dtype)
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config, **kwargs)
    except Exception as exc:  # noqa: BLE001 - unknown architecture, attention kernel not installed...
        field = (
            "model.attn_implementation"
            if spec.attn_implementation and "attention" in str(exc).lower()
            else "model.name_or_path"
        )
        raise CptError(
            f"{field}: cannot build a causal LM from {spec.name_or_path!r} ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _safetensors_files(path: str, revision: str | None) -> list[str]:
    folder = Path(path)
    if folder.is_dir():
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CptError(f"model.name_or_path: {index} is not a safetensors index ({_first_line(exc)})") from None
            files = sorted({str(folder / name) for name in weight_map.values()})
            missing = [name for name in files if not Path(name).is_file()]
            if missing:
                raise CptError(
                    f"model.name_or_path: {index.name} names {Path(missing[0]).name}, which is missing from {path!r}"
                )
            return files
        files = sorted(str(name) for name in folder.glob("*.safetensors"))
        if not files:
            raise CptError(
                f"model.name_or_path: {path!r} has no *.safetensors weights; cpt reads safetensors only (save the "
                f"model with save_pretrained)"
            )
        return files
    from huggingface_hub import hf_hub_download

    for name in ("model.safetensors.index.json", "model.safetensors"):
        try:
            local = hf_hub_download(path, name, revision=revision)
        except Exception:  # noqa: BLE001 - not there, or no hub access
            continue
        if name == "model.safetensors":
            return [local]
        weight_map = json.loads(Path(local).read_text())["weight_map"]
        return [hf_hub_download(path, shard, revision=revision) for shard in sorted(set(weight_map.values()))]
    raise CptError(
        f"model.name_or_path: no safetensors weights found for {path!r} (locally or on the hub); use a local folder or "
        f"an asset"
    )


def _tensor_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise CptError(
                f"model.name_or_path: cannot read the safetensors header of {file} ({_first_line(exc)})"
            ) from None
    return shapes


def uses_targets(recipe: Recipe) -> bool:
    """Whether the run reads the ``targets`` tensors: merge strategies and the geometry diagnostics."""
    from cpt.merging.contract import MergeStrategy
    from cpt.strategies import get_strategy

    return recipe.geometry.enabled or issubclass(get_strategy(recipe.strategy.name).integrator_class, MergeStrategy)


def count_target_tensors(recipe: Recipe, shapes: dict[str, tuple[int, ...]]) -> int:
    """Target tensors of METHOD §1 in the base: 2-D and matched by a ``targets`` regex."""
    from cpt.tensors import compile_targets, is_target

    patterns = compile_targets(recipe.targets)
    return sum(1 for name, shape in shapes.items() if len(shape) == 2 and is_target(name, patterns))


def check_targets(recipe: Recipe, shapes: dict[str, tuple[int, ...]]) -> int:
    matched = count_target_tensors(recipe, shapes)
    if matched == 0:
        users = [f"strategy {recipe.strategy.name!r}"] if recipe.strategy.name != "sequential" else []
        if recipe.geometry.enabled:
            users.append("the geometry diagnostics")
        example = next((name for name, shape in shapes.items() if len(shape) == 2), "")
        raise CptError(
            f"targets: {recipe.targets} select no 2-D tensor of the base model, which "
            f"{' and '.join(users) or 'the run'} needs; "
            f"a tensor name looks like {example!r}"
        )
    return matched


def check_lora_modules(recipe: Recipe, shapes: dict[str, tuple[int, ...]]) -> None:
    if recipe.peft is None or recipe.peft.target_modules == "all-linear":
        return
    modules = {part for name in shapes for part in name.split(".")}
    unknown = [module for module in recipe.peft.target_modules if module not in modules]
    if unknown:
        raise CptError(
            f"peft.target_modules: {unknown} name no module of the model; e.g. "
            f"{sorted(m for m in modules if m.endswith('proj'))[:7]}"
        )


# ---------------------------------------------------------------------- data and training
def _render(value: Any, tokenizer: Any, *, prompt: bool) -> str:
    """One line showing a rendered prompt or completion (chat messages through the template)."""
    if isinstance(value, list):
        text = None
        if getattr(tokenizer, "chat_template", None):
            try:
                text = (
                    tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=prompt)
                    if prompt
                    else None
                )
            except Exception:  # noqa: BLE001 - show the raw messages instead
                text = None
        if text is None:
            text = " | ".join(f"{m.get('role')}: {m.get('content')}" for m in value if isinstance(m, dict))
        value = text
    shown = repr(str(value))
    return shown if len(shown) <= 160 else shown[:157] + "...'"


def build_sft_config(recipe: Recipe, task: TaskSpec, index: int, output_dir: str):
    """The task's real ``trl.SFTConfig`` (as the runner builds it)."""
    from trl import SFTConfig

    try:
        return SFTConfig(output_dir=output_dir, seed=recipe.seed + index + 1, **recipe.training_args(task))
    except Exception as exc:  # noqa: BLE001 - TrainingArguments raise ValueError, TypeError, ImportError...
        raise CptError(
            f"tasks[{index}].training: SFTConfig refused these settings ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def check_training(args, recipe: Recipe, index: int) -> None:
    """What ``SFTTrainer``/``Trainer`` would refuse only when training starts: batch sizes, the
    optimizer and scheduler (built on a dummy parameter), trackers, eval and padding settings."""
    import torch
    from transformers import Trainer, get_scheduler

    where = f"tasks[{index}].training"
    if args.per_device_train_batch_size < 1:
        raise CptError(f"{where}.per_device_train_batch_size: {args.per_device_train_batch_size} must be at least 1")
    if args.gradient_accumulation_steps < 1:
        raise CptError(f"{where}.gradient_accumulation_steps: {args.gradient_accumulation_steps} must be at least 1")
    if args.max_steps <= 0 and not args.num_train_epochs > 0:
        raise CptError(
            f"{where}.num_train_epochs: {args.num_train_epochs} trains no step; give a positive number (or max_steps)"
        )
    if args.eval_strategy != "no" or args.load_best_model_at_end:
        raise CptError(
            f"{where}.eval_strategy: {_name(args.eval_strategy)!r} needs a trainer eval set, which cpt does not pass; "
            "cpt evaluates every task itself (recipe 'evaluation:'), so leave eval_strategy at 'no'"
        )
    if args.fp16 and not torch.cuda.is_available():
        raise CptError(f"{where}.fp16: fp16 mixed precision needs a CUDA GPU; use bf16 or float32 on this machine")
    if args.padding_free and not args.packing and args.max_length is not None:
        raise CptError(
            f"{where}.padding_free: without packing, padding_free does not enforce max_length; set packing: true or "
            f"max_length: null"
        )
    try:
        from transformers.integrations import get_reporting_integration_callbacks

        get_reporting_integration_callbacks(args.report_to)
    except Exception as exc:  # noqa: BLE001 - unknown or uninstalled tracker
        raise CptError(f"{where}.report_to: {args.report_to!r} ({_first_line(exc)})") from None
    dummy = torch.nn.Parameter(torch.zeros(2))
    try:
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        optimizer = optimizer_class([dummy], **optimizer_kwargs)
    except Exception as exc:  # noqa: BLE001 - bad learning rate, betas, optimizer package missing
        raise CptError(
            f"{where}: the optimizer {_name(args.optim)!r} refused these settings ({type(exc).__name__}: "
            f"{_first_line(exc)})"
        ) from None
    try:
        get_scheduler(
            args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=args.get_warmup_steps(100),
            num_training_steps=100,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
    except Exception as exc:  # noqa: BLE001
        raise CptError(
            f"{where}: the learning-rate scheduler {_name(args.lr_scheduler_type)!r} refused these settings "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def collate_check_batch(args, tokenizer, dataset, where: str) -> tuple[int, int]:
    """Tokenize the first examples the way ``SFTTrainer`` prepares its dataset, collate them; return the batch shape."""
    import types

    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    sample = dataset.select(range(min(COLLATE_EXAMPLES, len(dataset))))
    conversational = isinstance(sample[0]["prompt"], list)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise CptError(
            f"{where}.fields: the examples are chat messages but the tokenizer has no chat template; set fields.chat: "
            f"false or use a chat model"
        )
    # SFTTrainer._prepare_dataset reads these three attributes of the trainer.
    trainer_view = types.SimpleNamespace(
        _tokenizer=tokenizer,
        chat_template=None,
        completion_only_loss=True if args.completion_only_loss is None else args.completion_only_loss,
    )
    try:
        prepared = SFTTrainer._prepare_dataset(trainer_view, sample, tokenizer, args, args.packing, None, "preflight")
    except Exception as exc:  # noqa: BLE001 - tokenization of user data and settings
        raise CptError(
            f"{where}: tokenizing the first examples failed ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    if len(prepared) == 0:
        raise CptError(
            f"{where}: none of the first {len(sample)} examples keeps a completion token after truncation to "
            f"max_length={args.max_length}; raise training.max_length or shorten the prompts"
        )
    padding_free = bool(args.padding_free or (args.packing and args.packing_strategy == "bfd"))
    collator = DataCollatorForLanguageModeling(
        pad_token_id=tokenizer.pad_token_id,
        padding_free=padding_free,
        pad_to_multiple_of=args.pad_to_multiple_of,
    )
    keys = [key for key in ("input_ids", "labels", "seq_lengths") if key in prepared.column_names]
    rows = [
        {key: row[key] for key in keys}
        for row in prepared.select(range(min(args.per_device_train_batch_size, len(prepared))))
    ]
    try:
        batch = collator(rows)
    except Exception as exc:  # noqa: BLE001
        raise CptError(
            f"{where}: the data collator failed on the first batch ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    if not bool((batch["labels"] != -100).any()):
        raise CptError(
            f"{where}: the first batch has no token to learn from (every label is masked); check fields and max_length"
        )
    return tuple(batch["input_ids"].shape)


def optimizer_steps(args, examples: int, world_size: int) -> int:
    """Optimizer steps of a task, as ``transformers.Trainer`` counts them (``set_initial_training_values``)."""
    if args.max_steps > 0:
        return int(args.max_steps)
    batches = (
        math.ceil(examples / (args.per_device_train_batch_size * world_size))
        if not args.dataloader_drop_last
        else examples // (args.per_device_train_batch_size * world_size)
    )
    per_epoch = max(
        batches // args.gradient_accumulation_steps + int(batches % args.gradient_accumulation_steps > 0), 1
    )
    return math.ceil(args.num_train_epochs * per_epoch)


# ---------------------------------------------------------------------- run directory
def run_dir_action(recipe: Recipe, overwrite: bool) -> tuple[str, str]:
    """What ``cpt run`` will do with the run directory: (action, one-line detail); refusals raise."""
    from cpt.io import read_json
    from cpt.recovery import manifest_owner

    root = recipe.run_dir
    blocking = next((parent for parent in root.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise CptError(f"output_dir: {str(blocking)!r} is a file, not a folder; choose another 'output_dir'")
    existing = next(parent for parent in (root, *root.parents) if parent.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CptError(f"output_dir: cannot create {str(root)!r}: {str(existing)!r} is not writable")
    if root.exists() and not root.is_dir():
        raise CptError(f"output_dir/name: {root} is a file, not a run directory; choose another 'name' or 'output_dir'")
    try:
        manifest = read_json(root / "manifest.json")
    except ValueError:
        manifest = {"recipe_fingerprint": None}
    fingerprint = recipe.fingerprint()
    if manifest is None and manifest_owner(root) != root:  # an --overwrite interrupted before the new run started
        root = manifest_owner(root)
        manifest = read_json(root / "manifest.json")
    if manifest is not None and manifest.get("recipe_fingerprint") == fingerprint:
        if manifest.get("status") == "complete":
            return "complete", "complete (same recipe); nothing left to run"
        done = sum(1 for task in manifest.get("tasks", []) if task.get("status") == "done")
        return "resume", f"resumes the interrupted run (same recipe; {done}/{len(recipe.tasks)} tasks done)"
    if manifest is not None:
        if not overwrite:
            raise CptError(
                f"{root} holds a run of a different recipe (fingerprint {manifest.get('recipe_fingerprint')} != "
                f"{fingerprint}); "
                "pass --overwrite to start it again, or change 'name' or 'output_dir'"
            )
        return (
            "overwrite",
            f"holds another recipe's run: --overwrite moves it to {root.name}.previous, deleted once this run has "
            f"started",
        )
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise CptError(
                f"{root} exists and is not a cpt run directory; pass --overwrite to replace it or choose another 'name'"
            )
        return (
            "overwrite",
            f"is not a run directory: --overwrite moves it to {root.name}.previous, deleted once this run has started",
        )
    return "fresh", "new run"


# ---------------------------------------------------------------------- the whole check
def check_recipe(recipe: Recipe, *, overwrite: bool = False, world_size: int | None = None) -> RunPlan:
    """Check everything ``cpt run`` needs (module docstring) without touching the run directory.

    Args:
        recipe: a validated recipe (:func:`cpt.recipe.load_recipe`).
        overwrite: whether ``--overwrite`` is given (decides whether another run's directory is refused).
        world_size: processes the run will use (default: the current accelerate state's).

    Returns:
        The :class:`RunPlan`; raises :class:`~cpt.errors.CptError` with one line on the first problem.
    """
    from cpt.data import build_task_data
    from cpt.strategies import get_strategy

    if world_size is None:
        from accelerate import PartialState

        world_size = PartialState().num_processes
    strategy = get_strategy(recipe.strategy.name)
    params = strategy.make_params(recipe.strategy.params)
    action, detail = run_dir_action(recipe, overwrite)

    model_path = resolve_model_path(recipe)
    tokenizer, files, shapes = check_model(recipe, model_path)
    disk = check_disk_space(recipe, files, shapes) if action != "complete" else None
    check_lora_modules(recipe, shapes)
    targets = check_targets(recipe, shapes) if uses_targets(recipe) else None

    plans = []
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the check's own small maps need no progress bars
    with tempfile.TemporaryDirectory(prefix="cpt-check-") as scratch, _restore_progress_bars(bars_were_on):
        for index, task in enumerate(recipe.tasks):
            where = f"tasks[{index}]"
            data = build_task_data(task, index, recipe.seed)
            if len(data.train) == 0:
                raise CptError(f"{where}.train: no training examples left")
            if not data.eval_examples:
                raise CptError(f"{where}.eval: no eval examples")
            args = build_sft_config(recipe, task, index, scratch)
            check_training(args, recipe, index)
            shape = collate_check_batch(args, tokenizer, data.train, where)
            first = data.train[0]
            completion = first["completion"]
            plans.append(
                TaskPlan(
                    name=task.name,
                    train_examples=len(data.train),
                    eval_examples=len(data.eval_examples),
                    eval_kind=data.eval_kind,
                    optimizer_steps=optimizer_steps(args, len(data.train), world_size),
                    batch_tokens=shape,
                    sample_prompt=_render(first["prompt"], tokenizer, prompt=True),
                    sample_completion=_render(
                        completion[0]["content"] if isinstance(completion, list) else completion,
                        tokenizer,
                        prompt=False,
                    ),
                )
            )
        # Probes are evaluated, never trained: their data and field mappings load like a task's eval set.
        from cpt.data import build_probe_data

        probe_plans = [
            (probe.name, "lm-eval" if data is None else f"{len(data.eval_examples)} {data.eval_kind}")
            for probe, data in zip(recipe.probes, build_probe_data(recipe.probes, recipe.seed))
        ]
    import dataclasses

    return RunPlan(
        recipe=recipe,
        model_path=model_path,
        strategy=strategy.name,
        strategy_params=dataclasses.asdict(params),
        train_from=recipe.strategy.train_from or strategy.train_from,
        run_dir=recipe.run_dir,
        action=action,
        action_detail=detail,
        world_size=world_size,
        target_tensors=targets,
        tasks=plans,
        probes=probe_plans,
        disk=disk,
    )


@contextlib.contextmanager
def _restore_progress_bars(enabled: bool):
    try:
        yield
    finally:
        if enabled:
            import datasets

            datasets.enable_progress_bars()


def _name(value: Any) -> str:
    """An enum's value (``OptimizerNames.ADAMW_TORCH`` → ``adamw_torch``), anything else as text."""
    return str(getattr(value, "value", value))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r"\s+", " ", line)[:300]


def announce_plan(plan: RunPlan) -> None:
    """Log the plan's summary (main process only), as ``cpt run`` does before it starts."""
    import sys

    from accelerate import PartialState

    if PartialState().is_main_process:
        tasks = ", ".join(
            f"{task.name} ({task.train_examples} ex, {task.optimizer_steps} steps)" for task in plan.tasks
        )
        print(f"[cpt] preflight OK: {plan.run_dir} {plan.action_detail}; tasks {tasks}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- cpt merge / cpt geometry inputs
def check_target_patterns(patterns: list[str] | None, where: str = "--targets") -> None:
    for pattern in patterns or []:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise CptError(f"{where}: {pattern!r} is not a valid regular expression ({exc})") from None


def check_output_path(output: str | os.PathLike, *, folder: bool, where: str = "--output") -> None:
    """``output`` can be written: a folder (``folder=True``) or a file, with no file in the way."""
    output = Path(output)
    if folder and output.exists() and not output.is_dir():
        raise CptError(f"{where}: {str(output)!r} is a file; give a folder to write to")
    if not folder and output.is_dir():
        raise CptError(f"{where}: {str(output)!r} is a folder; give a file name")
    blocking = next((parent for parent in output.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise CptError(f"{where}: {str(blocking)!r} is a file, not a folder")


def check_device(device: str | None, where: str = "--device") -> None:
    import torch

    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise CptError(f"{where}: {device!r} is not a device; use cpu or cuda (cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise CptError(f"{where}: {device!r} asked for, but no CUDA GPU is available here; use --device cpu")


def check_checkpoint_set(base: str, checkpoints: list[str], targets: list[str] | None) -> None:
    """Before ``cpt merge`` writes anything: every checkpoint holds the base's tensors with the
    same shapes, and ``targets`` select some of them."""
    from cpt.diagnostics import checkpoint_folder
    from cpt.recipe import DEFAULT_TARGETS
    from cpt.tensors import SafetensorsWeights, compile_targets, expert_weights, is_target

    check_target_patterns(targets)
    base_weights = SafetensorsWeights(checkpoint_folder(base))
    names = base_weights.names()
    patterns = compile_targets(targets or DEFAULT_TARGETS)
    if not any(len(base_weights.shape(name)) == 2 and is_target(name, patterns) for name in names):
        raise CptError(
            f"--targets: {targets or DEFAULT_TARGETS} select no 2-D tensor of {base} (a name looks like {names[0]!r})"
        )
    for path in checkpoints:
        weights = expert_weights(checkpoint_folder(path), base_weights)  # an HF folder or a LoRA adapter
        for name in names:
            if name not in weights:
                raise CptError(f"{path}: has no tensor {name} of the base; is it a fine-tune of {base}?")
            if weights.shape(name) != base_weights.shape(name):
                raise CptError(
                    f"{path}: {name} has shape {tuple(weights.shape(name))}, the base "
                    f"{tuple(base_weights.shape(name))}; is it a fine-tune of {base}?"
                )
