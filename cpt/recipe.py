"""The recipe: one YAML file that describes a whole continual post-training run.

A recipe is validated by pydantic models with unknown keys forbidden. Every validation
problem is reported as one line that names the field path (``tasks[1].eval.kind``) and
what is accepted; :func:`load_recipe` raises :class:`~cpt.errors.CptError` with it.

Relative paths (data files, ``output_dir``) are taken relative to the current working
directory, like every Hugging Face script.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
import string
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from cpt.diagnostics import GeometrySettings
from cpt.errors import CptError

#: Regexes (``re.search`` on the parameter name) selecting the target tensors of METHOD §1:
#: the q/k/v/o and gate/up/down projection weights of every transformer block.
DEFAULT_TARGETS = [
    r"\.(q|k|v|o)_proj\.weight$",
    r"\.(gate|up|down)_proj\.weight$",
]

#: SFTConfig fields cpt sets itself for every task; a recipe may not set them.
MANAGED_TRAINING_FIELDS = {
    "output_dir": "cpt writes each task's trainer output under <run dir>/work/<task>",
    "resume_from_checkpoint": "cpt resumes by itself when the same command is run again",
}


def size_in_bytes(value: int | str) -> int:
    """Bytes of a shard size (``"500MB"``, ``"2GiB"`` or an int), parsed as Hugging Face parses it;
    ValueError naming the value when it is not a positive size."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        size = value if isinstance(value, int) else parse_size_to_int(value)
    except (ValueError, TypeError):
        raise ValueError(f'{value!r} is not a size; write e.g. "500MB", "2GB" or a number of bytes') from None
    if size <= 0:
        raise ValueError(f"must be positive (got {value!r})")
    return size


def _check_regexes(patterns: list[str]) -> list[str]:
    """Every pattern compiles (recipe fields holding regular expressions)."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({exc})") from None
    return patterns


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSpec(_Strict):
    """The base model θ0."""

    name_or_path: str = Field(description="hub id, local HF folder, or a named offline asset (`cpt assets list`)")
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = None


class LoraSpec(_Strict):
    """Optional LoRA training (PEFT). The adapter is merged into full weights at integration."""

    r: int = Field(16, gt=0)
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    use_rslora: bool = False
    init_lora_weights: bool = True


class StrategySpec(BaseModel):
    """``strategy:`` — a registered strategy name plus its parameters, given flat.

    ``strategy: sequential`` is shorthand for ``strategy: {name: sequential}``.
    """

    model_config = ConfigDict(extra="allow")
    name: str = "sequential"
    train_from: Literal["state", "base"] | None = Field(
        None, description="start each expert from the current state θ_{t-1} or the base θ0 (default: the strategy's)"
    )

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class GeometrySpec(_Strict):
    """The end-of-task geometry-conflict diagnostics (METHOD §1)."""

    enabled: bool = True
    # The analysis defaults are GeometrySettings's (defined once, beside the code that uses them).
    rank: int = Field(GeometrySettings.rank, gt=0)
    energy: float = Field(GeometrySettings.energy, gt=0, le=1)
    eps: float = Field(GeometrySettings.eps, gt=0)
    eig_floor: float = Field(GeometrySettings.eig_floor, ge=0)
    keep_updates: bool = Field(
        False, description="keep each task's update to also report conflict with earlier updates"
    )
    top_k: int = Field(10, gt=0)


class DivergenceSpec(_Strict):
    """``divergence:`` — stop a task whose training stalled or exploded without a NaN loss.

    Checked at every logged step (``training.logging_steps``) by
    :class:`cpt.training.divergence.DivergenceMonitor`; the task stops, its expert is not
    integrated, the last good state stays, and the run exits with status 1 and one line
    saying which rule tripped. The defaults never trip on healthy training: they need an
    exact stall (gradient norm 0, the same loss to 6 digits) or a 100-fold weight norm.
    """

    enabled: bool = True
    patience: int = Field(3, gt=0, description="consecutive logged steps, after the first, that a stall must last")
    grad_norm_floor: float = Field(0.0, ge=0, description="a logged gradient norm at or below this counts as zero")
    loss_rtol: float = Field(
        1e-6, ge=0, description="a logged loss within this relative distance of the previous one has not moved"
    )
    max_weight_growth: float = Field(
        100.0,
        gt=1,
        description="stop when the trained weights' norm exceeds this multiple of its value at the task's start",
    )


class EvaluationSpec(_Strict):
    """``evaluation:`` — how the accuracy matrix R (METHOD §5) is scored."""

    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    evaluate_base: bool = True
    evaluate_experts: bool = True
    rows: Literal["all", "needed"] = Field(
        "all",
        description=(
            "which entries of the accuracy matrix to score: 'all' (every task after every step) or 'needed' "
            "(only the entries METHOD §5's ACC, BWT, FWT and forgetting read, "
            "cpt.evaluation.continual.needed_entries; the others stay null)"
        ),
    )


class DataSource(_Strict):
    """Exactly one of ``path`` (local jsonl/json/csv/parquet), ``hub`` (dataset id), ``asset``."""

    path: str | None = None
    hub: str | None = None
    asset: str | None = None
    split: str | None = Field(None, description="hub or asset split (default: train for training data, test for eval)")
    config: str | None = Field(None, description="hub dataset configuration name")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DataSource:
        given = [key for key in ("path", "hub", "asset") if getattr(self, key)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'path', 'hub' or 'asset' (got {given or 'none'})")
        if self.path:
            suffix = Path(self.path).suffix.lower()
            if suffix not in DATA_FILE_FORMATS:
                raise ValueError(
                    f"path {self.path!r}: unsupported file type {suffix or '(none)'}; accepted: {', '.join(DATA_FILE_FORMATS)}"
                )
        return self


#: file suffix → `datasets` builder name.
DATA_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class FieldMapping(_Strict):
    """How a row of the task's data becomes a prompt/completion pair (or chat messages).

    ``prompt_template`` and ``completion_template`` are Python format strings over the
    row's columns plus ``{prompt}`` and ``{completion}`` (the mapped columns). With
    ``messages`` set, the row holds a full conversation that ends with the assistant's
    answer: it trains as a conversational prompt (all earlier turns) and completion (the
    last turn), so the loss covers the final answer only.
    """

    prompt: str | None = "input"
    completion: str | None = "target"
    messages: str | None = None
    choices: str | None = Field(None, description="column with the list of options (eval kind 'choice')")
    label: str | None = Field(
        None, description="column with the index of the right option; default: the option equal to the completion"
    )
    prompt_template: str = "{prompt}"
    completion_template: str = "{completion}"
    chat: bool = Field(False, description="render string prompts through the tokenizer's chat template")
    system: str | None = Field(None, description="system message for chat prompts")

    @model_validator(mode="after")
    def _mapping_complete(self) -> FieldMapping:
        if self.messages is None and (self.prompt is None or self.completion is None):
            raise ValueError("set 'messages', or both 'prompt' and 'completion'")
        for key in ("prompt_template", "completion_template"):
            try:
                list(string.Formatter().parse(getattr(self, key)))
            except ValueError as exc:
                raise ValueError(
                    f"{key} is not a valid format string ({exc}); write literal braces as {{{{ and }}}}"
                ) from None
        return self


class NormalizeSpec(_Strict):
    """Answer normalisation before exact match (options of the shipped exact_match metric)."""

    ignore_case: bool = True
    ignore_punctuation: bool = False
    ignore_numbers: bool = False
    strip: bool = True
    collapse_whitespace: bool = True
    first_line: bool = True
    regexes_to_ignore: list[str] = []

    @field_validator("regexes_to_ignore")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        return _check_regexes(patterns)


class EvalSpec(_Strict):
    kind: Literal["generate", "choice"] = "generate"
    data: DataSource | None = Field(None, description="own eval data; default: the asset's test split")
    held_out: int | None = Field(None, gt=0, description="hold out this many training examples as the eval set")
    max_examples: int | None = Field(None, gt=0)
    normalize: NormalizeSpec = NormalizeSpec()
    max_new_tokens: int | None = Field(None, gt=0)
    length_normalize: bool = False

    @model_validator(mode="after")
    def _one_eval_source(self) -> EvalSpec:
        if self.data is not None and self.held_out is not None:
            raise ValueError("give either 'data' or 'held_out', not both")
        return self


class TaskSpec(_Strict):
    name: str
    train: DataSource
    fields: FieldMapping = FieldMapping()
    eval: EvalSpec = EvalSpec()
    max_examples: int | None = Field(None, gt=0, description="use at most this many training examples")
    training: dict[str, Any] = Field({}, description="SFTConfig overrides for this task")

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(
                f"task name {name!r} must be letters, digits, '_', '-' or '.', starting with a letter or digit"
            )
        return name

    @model_validator(mode="after")
    def _eval_source_known(self) -> TaskSpec:
        if self.eval.data is None and self.eval.held_out is None and self.train.asset is None:
            raise ValueError(
                "eval: give 'data' (an eval file) or 'held_out' (a size); only asset data has a default test split"
            )
        if self.eval.kind == "choice" and self.fields.choices is None:
            raise ValueError("eval kind 'choice' needs fields.choices (the column with the options)")
        return self


class LmEvalSpec(_Strict):
    """``lm_eval:`` — a probe scored by lm-evaluation-harness (the optional ``lm-eval`` extra).

    Exactly one of ``task`` (a task name lm-eval knows, e.g. ``arc_easy``; its data must be
    in the local datasets cache when offline) or ``yaml`` (a task YAML file, e.g. over a
    local jsonl file). Scored by :func:`cpt.evaluation.lm_eval_probe.evaluate_lm_eval` on the
    live model with ``lm_eval.simple_evaluate``.
    """

    task: str | None = None
    yaml: str | None = Field(None, description="path of an lm-eval task YAML (relative to the current directory)")
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, gt=0, description="score at most this many documents")
    metric: str | None = Field(
        None,
        description="the result metric used as the score (e.g. 'acc'); default: acc, else exact_match, else the first",
    )

    @model_validator(mode="after")
    def _task_or_yaml(self) -> LmEvalSpec:
        given = [key for key in ("task", "yaml") if getattr(self, key)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'task' or 'yaml' (got {given or 'none'})")
        return self


class ProbeSpec(_Strict):
    """``probes:`` — an eval-only task: scored for the base and after every task, never trained.

    A probe measures general ability outside the sequence's own tasks. It reads its examples
    from ``data`` with the same ``fields`` and ``eval`` settings as a task (``eval.data`` and
    ``eval.held_out`` do not apply: ``data`` is the eval set; an asset's default split is
    ``test``), or is scored by lm-evaluation-harness (``lm_eval``). Probe scores are their
    own columns (``matrix.json``'s ``probe_rows``) and never enter ACC/BWT/forgetting, which
    METHOD §5 defines over the sequence's tasks.
    """

    name: str
    data: DataSource | None = None
    fields: FieldMapping = FieldMapping()
    eval: EvalSpec = EvalSpec()
    lm_eval: LmEvalSpec | None = None

    _slug = field_validator("name")(TaskSpec._slug.__func__)

    @model_validator(mode="after")
    def _one_source(self) -> ProbeSpec:
        if (self.data is None) == (self.lm_eval is None):
            raise ValueError("give exactly one of 'data' (an eval set scored like a task) or 'lm_eval'")
        if self.eval.data is not None or self.eval.held_out is not None:
            raise ValueError("eval.data and eval.held_out do not apply to a probe: its 'data' is the eval set")
        if self.data is not None and self.eval.kind == "choice" and self.fields.choices is None:
            raise ValueError("eval kind 'choice' needs fields.choices (the column with the options)")
        return self


class Recipe(_Strict):
    name: str
    output_dir: str = "runs"
    seed: int = 42
    model: ModelSpec
    peft: LoraSpec | None = None
    training: dict[str, Any] = Field({}, description="SFTConfig fields for every task")
    strategy: StrategySpec = StrategySpec()
    targets: list[str] = Field(DEFAULT_TARGETS, min_length=1, description="regexes selecting target tensors")
    max_shard_size: int | str | None = Field(
        None,
        description='largest safetensors shard of a written state, e.g. "500MB" (default: save_pretrained\'s)',
    )
    geometry: GeometrySpec = GeometrySpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    divergence: DivergenceSpec = DivergenceSpec()
    tasks: list[TaskSpec] = Field(min_length=1)
    probes: list[ProbeSpec] = Field([], description="eval-only tasks measuring general ability (never trained)")

    @field_validator("name")
    @classmethod
    def _run_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"run name {name!r} must be letters, digits, '_', '-' or '.'")
        return name

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            size_in_bytes(value)  # refused here with the same words the merge would use
        return value

    @field_validator("targets")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        return _check_regexes(patterns)

    @model_validator(mode="after")
    def _unique_task_names(self) -> Recipe:
        seen: set[str] = set()
        for task in self.tasks:
            if task.name in seen:
                raise ValueError(f"task name {task.name!r} is used twice; task names must be unique")
            seen.add(task.name)
        probe_names: set[str] = set()
        for probe in self.probes:
            if probe.name in probe_names:
                raise ValueError(f"probe name {probe.name!r} is used twice; probe names must be unique")
            probe_names.add(probe.name)
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def fingerprint(self) -> str:
        """Hash of everything that changes results; a run directory belongs to one fingerprint.

        ``divergence`` thresholds are left out: they only decide whether a task stops, so a run
        may be resumed with other thresholds (and runs made before the section existed keep
        their fingerprint).

        ``probes`` count like the ``evaluation`` settings (which are in the hash: both decide
        what the run's records hold); a recipe without probes leaves the key out, so runs made
        before probes existed keep their fingerprint.

        ``evaluation.rows`` is left out: it only decides which matrix entries are scored, and every
        entry a metric reads is scored either way, so a run may resume with the other value: from
        ``all`` to ``needed`` its earlier rows simply hold more; from ``needed`` to ``all`` the rows
        scored before keep their skipped (null) entries, since the states they need are gone (the
        runner says so). Either way every metric equals that of an uninterrupted run.
        """
        # max_shard_size only changes how the state's bytes are split into files
        dumped = self.model_dump(
            mode="json", exclude={"divergence": True, "max_shard_size": True, "evaluation": {"rows"}}
        )
        if not dumped["probes"]:
            del dumped["probes"]
        canonical = json.dumps(dumped, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def training_args(self, task: TaskSpec) -> dict[str, Any]:
        """The SFTConfig keyword arguments of ``task``: cpt defaults ⊕ recipe ⊕ task overrides."""
        return {**default_training_args(), **self.training, **task.training}


# ---------------------------------------------------------------------- SFTConfig checks
def default_training_args() -> dict[str, Any]:
    """cpt's defaults on top of SFTConfig's own: CPU-friendly where no GPU is present."""
    import torch

    args: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "logging_steps": 5}
    if not torch.cuda.is_available():
        # SFTConfig defaults to bf16 + gradient checkpointing, which fail or crawl on CPU.
        args.update(use_cpu=True, bf16=False, activation_checkpointing=False)
    return args


@functools.lru_cache(maxsize=1)
def _sft_field_types() -> dict[str, Any]:
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    return {field.name: hints[field.name] for field in dataclasses.fields(SFTConfig) if field.init}


def check_training_args(args: dict[str, Any], where: str) -> None:
    """Validate SFTConfig keyword arguments: known fields, right types, accepted by SFTConfig."""
    import tempfile

    from trl import SFTConfig

    field_types = _sft_field_types()
    for key, value in args.items():
        if key in MANAGED_TRAINING_FIELDS:
            raise CptError(f"{where}.{key}: set by cpt, not by the recipe ({MANAGED_TRAINING_FIELDS[key]})")
        if key not in field_types:
            close = difflib.get_close_matches(key, field_types, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see trl.SFTConfig for the accepted fields"
            raise CptError(f"{where}.{key}: not an SFTConfig field{hint}")
        try:
            TypeAdapter(field_types[key]).validate_python(value)
        except ValidationError as exc:
            raise CptError(
                f"{where}.{key}: {value!r} is not a valid {_type_name(field_types[key])} ({exc.errors()[0]['msg']})"
            ) from None
    with tempfile.TemporaryDirectory() as scratch:
        try:
            SFTConfig(output_dir=scratch, **args)
        except (ValueError, TypeError) as exc:
            raise CptError(f"{where}: SFTConfig refused these settings: {exc}") from None


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


# ---------------------------------------------------------------------- loading
class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` as a float (YAML 1.2) rather than a string."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """``key.sub=value`` strings (values parsed as YAML) → (path, value) pairs."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CptError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.learning_rate=1e-4")
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise CptError(
                f"--set {key.strip()}: {raw!r} is not a valid YAML value ({problem}); quote it, e.g. --set '{key.strip()}=\"{raw}\"'"
            ) from None
        parsed.append((key.strip().split("."), value))
    return parsed


def _unshared(node: Any) -> Any:
    """A copy of YAML data in which no two places share a dict or list (YAML anchors/aliases
    load as one shared object, so ``--set tasks.2.fields...`` would also change every alias)."""
    if isinstance(node, dict):
        return {key: _unshared(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unshared(value) for value in node]
    return node


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    if overrides:  # in place: callers keep using ``data``
        data.update({key: _unshared(value) for key, value in data.items()})
    for path, value in parse_overrides(overrides):
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[_list_index(part, path, depth, len(node))]
            elif isinstance(node, dict):
                if isinstance(node.get(part), str) and part == "strategy":
                    node[part] = {"name": node[part]}
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise CptError(f"--set {'.'.join(path)}: {'.'.join(path[:depth])} is not a section")
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(last, path, len(path) - 1, len(node))] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise CptError(f"--set {'.'.join(path)}: {'.'.join(path[:-1])} is not a section")
    return data


def _list_index(part: str, path: list[str], depth: int, length: int) -> int:
    if not part.isdigit():
        raise CptError(f"--set {'.'.join(path)}: {'.'.join(path[: depth + 1])} must be a list index")
    index = int(part)
    if index >= length:
        where = ".".join(path[:depth])
        raise CptError(
            f"--set {'.'.join(path)}: {where} has {length} item(s), so the index must be 0 to {length - 1} (got {index})"
            if length
            else f"--set {'.'.join(path)}: {where} is empty"
        )
    return index


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem becomes a one-line CptError."""
    path = Path(path)
    if not path.is_file():
        raise CptError(
            f"recipe file {str(path)!r} not found; pass the path of a recipe YAML such as recipes/quickstart.yaml"
        )
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise CptError(f"{path}: {where}invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise CptError(f"{path}: a recipe is a YAML mapping with keys such as name, model, tasks")
    data = apply_overrides(data, overrides or [])
    return validate_recipe(data, source=str(path))


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise CptError(f"{source}: {format_validation_error(exc)}") from None
    _check_strategy(recipe, source)
    check_training_args({**default_training_args(), **recipe.training}, f"{source}: training")
    for index, task in enumerate(recipe.tasks):
        if task.training:
            check_training_args(recipe.training_args(task), f"{source}: tasks[{index}].training")
    return recipe


def _check_strategy(recipe: Recipe, source: str) -> None:
    from cpt.strategies import get_strategy

    try:
        spec = get_strategy(recipe.strategy.name)
    except CptError as exc:
        raise CptError(f"{source}: strategy: {exc}") from None
    try:
        spec.make_params(recipe.strategy.params)
    except CptError as exc:  # "<parameter>: problem": the parameter is the recipe key strategy.<parameter>
        message = str(exc)
        whole = message.startswith("parameters: ")  # a rule across parameters names none
        raise CptError(
            f"{source}: strategy: {message.removeprefix('parameters: ')}" if whole else f"{source}: strategy.{message}"
        ) from None


# ---------------------------------------------------------------------- error formatting
def _loc_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (to list accepted keys)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return model
        model = _first_model(field.annotation)
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


#: Pydantic's name for each branch of a union in an error's ``loc`` (``max_shard_size.int``,
#: ``step_coef.literal['norm']``): not a field, so left out of the path.
_UNION_BRANCHES = {"int", "float", "str", "bool", "bytes", "list", "dict", "none"}

#: What a union branch accepts, by the error type it reports (for "expected ... or ...").
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "dataclass_type": "a mapping",
}


def _field_loc(error: dict) -> tuple:
    """The error's ``loc`` without pydantic's union-branch and validator tags: the field's path."""
    return tuple(
        part for part in error["loc"] if not (isinstance(part, str) and ("[" in part or part in _UNION_BRANCHES))
    )


def _describe_union(path: str, branches: list[dict]) -> str:
    """One line for a value that every branch of a union refused: what each accepts, the value, a
    did-you-mean among the literal values (``expected a number or 'norm', got 'nrm' (did you mean 'norm'?)``)."""
    expected: list[str] = []
    literals: list[str] = []
    for error in branches:
        if error["type"] == "literal_error":
            values = [value.strip().strip("'") for value in re.split(r",| or ", error["ctx"]["expected"])]
            literals += [value for value in values if value]
            option = error["ctx"]["expected"]
        elif error["type"] == "value_error":
            option = error["msg"].removeprefix("Value error, ")
        else:
            option = _EXPECTED.get(error["type"], error["msg"].removeprefix("Input should be "))
        if option not in expected:
            expected.append(option)
    value = branches[0].get("input")
    close = difflib.get_close_matches(value, literals, n=1, cutoff=0.5) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}: expected {' or '.join(expected)}, got {value!r}{hint}"


def _describe(error: dict, where: str = "recipe") -> str:
    loc = _field_loc(error)
    path = _loc_path(loc) or where
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1])
        accepted = ", ".join(owner.model_fields) if owner else ""
        close = difflib.get_close_matches(str(loc[-1]), owner.model_fields, n=1) if owner else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{path}: unknown key{hint}; accepted keys: {accepted}"
    if kind == "missing":
        return f"{path}: required field is missing"
    message = error["msg"]
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    return f"{path}: {message}"


def format_validation_error(exc: ValidationError, where: str = "recipe") -> str:
    """One line for a pydantic error: the first problem, named by its field's path (``where`` when it
    concerns the whole object), and how many more there are.

    A value that no branch of a union accepts (pydantic reports one error per branch, located at
    ``field.<branch>``) is one problem: ``field: expected <what each branch accepts>, got <value>``,
    with a did-you-mean among the union's literal values.
    """
    problems: dict[tuple, list[dict]] = {}
    for error in exc.errors():
        problems.setdefault(_field_loc(error), []).append(error)
    loc, errors = next(iter(problems.items()))
    in_union = len(errors) > 1 and any(_field_loc(error) != tuple(error["loc"]) for error in errors)
    first = _describe_union(_loc_path(loc) or where, errors) if in_union else _describe(errors[0], where)
    more = len(problems) - 1 + (0 if in_union else len(errors) - 1)
    return first if more == 0 else f"{first} (and {more} more problem(s))"
