"""Task data: load rows from local files, hub datasets or offline assets, and format them.

Every task becomes a training set in TRL's prompt/completion form (so the loss covers the
completion only) and a list of evaluation examples rendered exactly like the training
prompts. Chat data (``fields.messages``) trains as a conversational prompt (all turns but
the last) and completion (the final assistant turn).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from cpt.errors import CptError
from cpt.evaluation import ChoiceExample, GenerationExample
from cpt.recipe import DATA_FILE_FORMATS, DataSource, TaskSpec


@dataclass
class TaskData:
    name: str
    train: datasets.Dataset
    """Columns ``prompt`` and ``completion`` (strings, or chat message lists)."""
    eval_examples: list[GenerationExample] | list[ChoiceExample]
    eval_kind: str


def load_rows(source: DataSource, *, default_split: str, where: str) -> list[dict[str, Any]]:
    """Rows of a data source as plain dicts (``where`` names the recipe field for errors)."""
    if source.path:
        path = Path(source.path)
        if not path.is_file():
            raise CptError(
                f"{where}.path: file {str(path)!r} not found (relative paths are taken from the current directory)"
            )
        try:
            dataset = datasets.load_dataset(DATA_FILE_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as exc:  # datasets raises many types for malformed files
            raise CptError(
                f"{where}.path: could not read {str(path)!r} as {path.suffix[1:]} ({type(exc).__name__}: {exc})"
            ) from None
    elif source.asset:
        from cpt.assets import resolve_dataset

        split = source.split or default_split
        folder = resolve_dataset(source.asset)
        file = folder / f"{split}.jsonl"
        if not file.is_file():
            available = sorted(p.stem for p in folder.glob("*.jsonl"))
            raise CptError(
                f"{where}.split: asset {source.asset!r} has no split {split!r}; available: {', '.join(available)}"
            )
        dataset = datasets.load_dataset("json", data_files=str(file), split="train")
    else:
        split = source.split or default_split
        try:
            dataset = datasets.load_dataset(source.hub, source.config, split=split)
        except Exception as exc:
            raise CptError(
                f"{where}.hub: could not load {source.hub!r} split {split!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "without hub access use a local file ('path') or an offline asset ('asset')"
            ) from None
    rows = dataset.to_list()
    if not rows:
        raise CptError(f"{where}: the data is empty")
    return rows


def seeded_subset(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """At most ``limit`` rows, a seeded uniform sample kept in file order (deterministic)."""
    if limit is None or limit >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[index] for index in keep]


def hold_out(rows: list[dict], size: int, seed: int, where: str) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, held-out) split of ``rows``."""
    if size >= len(rows):
        raise CptError(f"{where}.held_out: {size} is not smaller than the {len(rows)} training rows")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    return [row for i, row in enumerate(rows) if i not in held], [row for i, row in enumerate(rows) if i in held]


class RowFormatter:
    """Turns a row into prompt/completion (training) and eval examples, per the task's fields."""

    def __init__(self, task: TaskSpec, where: str):
        self.fields = task.fields
        self.where = where

    def _column(self, row: dict, key: str) -> Any:
        column = getattr(self.fields, key)
        if column not in row:
            raise CptError(f"{self.where}.fields.{key}: column {column!r} not in the data; columns: {', '.join(row)}")
        return row[column]

    def _fill(self, template_key: str, row: dict, **values: Any) -> str:
        template = getattr(self.fields, template_key)
        try:
            return template.format(**{**row, **values})
        except KeyError as exc:
            raise CptError(
                f"{self.where}.fields.{template_key}: {{{exc.args[0]}}} is not a column; columns: {', '.join(row)}"
            ) from None
        except (IndexError, ValueError, AttributeError) as exc:
            raise CptError(f"{self.where}.fields.{template_key}: cannot fill {template!r} ({exc})") from None

    def prompt(self, row: dict) -> str | list[dict]:
        if self.fields.messages:
            messages = self._messages(row)
            return messages[:-1]
        value = self._column(row, "prompt")
        if isinstance(value, list):  # already a conversation (e.g. OpenAI evals)
            return value
        text = self._fill("prompt_template", row, prompt=value)
        if not self.fields.chat:
            return text
        system = [{"role": "system", "content": self.fields.system}] if self.fields.system else []
        return system + [{"role": "user", "content": text}]

    def completion_text(self, row: dict, answer: Any | None = None) -> str:
        if self.fields.messages:
            return self._messages(row)[-1]["content"]
        value = self._column(row, "completion") if answer is None else answer
        if isinstance(value, list):  # several accepted answers: train on the first
            value = value[0]
        return self._fill("completion_template", row, completion=value)

    def _messages(self, row: dict) -> list[dict]:
        messages = self._column(row, "messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
        ):
            raise CptError(
                f"{self.where}.fields.messages: column {self.fields.messages!r} must hold a list of {{role, content}} messages"
            )
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise CptError(
                f"{self.where}.fields.messages: each conversation must end with an assistant message after at least one other turn"
            )
        return messages

    def conversational(self, prompt: str | list[dict]) -> bool:
        return isinstance(prompt, list)

    def training_example(self, row: dict) -> dict[str, Any]:
        prompt = self.prompt(row)
        completion = self.completion_text(row)
        if self.conversational(prompt):
            return {"prompt": prompt, "completion": [{"role": "assistant", "content": completion}]}
        return {"prompt": prompt, "completion": completion}

    def generation_example(self, row: dict) -> GenerationExample:
        return GenerationExample(prompt=self.prompt(row), target=self.completion_text(row))

    def choice_example(self, row: dict) -> ChoiceExample:
        options = self._column(row, "choices")
        if not isinstance(options, list) or len(options) < 2:
            raise CptError(
                f"{self.where}.fields.choices: column {self.fields.choices!r} must hold a list of at least 2 options"
            )
        if self.fields.label is not None:
            label = self._column(row, "label")
            if not isinstance(label, int) or not 0 <= label < len(options):
                raise CptError(f"{self.where}.fields.label: {label!r} is not an index into the {len(options)} options")
        else:
            answer = self._column(row, "completion")
            answer = answer[0] if isinstance(answer, list) else answer
            if answer not in options:
                raise CptError(
                    f"{self.where}.fields.completion: answer {answer!r} is not one of the options {options}; set fields.label to an index column"
                )
            label = options.index(answer)
        continuations = [self.completion_text(row, answer=option) for option in options]
        return ChoiceExample(prompt=self.prompt(row), choices=continuations, label=label)


def build_task_data(task: TaskSpec, index: int, seed: int) -> TaskData:
    """Load and format task ``index`` of a recipe (deterministic for a given seed)."""
    where = f"tasks[{index}]"
    rows = load_rows(task.train, default_split="train", where=f"{where}.train")
    if task.eval.held_out is not None:
        rows, eval_rows = hold_out(rows, task.eval.held_out, seed, f"{where}.eval")
    elif task.eval.data is not None:
        eval_rows = load_rows(task.eval.data, default_split="test", where=f"{where}.eval.data")
    else:  # an asset's own test split
        eval_rows = load_rows(
            DataSource(asset=task.train.asset, split="test"), default_split="test", where=f"{where}.train"
        )
    rows = seeded_subset(rows, task.max_examples, seed)
    eval_rows = seeded_subset(eval_rows, task.eval.max_examples, seed)

    formatter = RowFormatter(task, where)
    train = datasets.Dataset.from_list([formatter.training_example(row) for row in rows])
    if task.eval.kind == "choice":
        eval_examples = [formatter.choice_example(row) for row in eval_rows]
    else:
        eval_examples = [formatter.generation_example(row) for row in eval_rows]
    return TaskData(name=task.name, train=train, eval_examples=eval_examples, eval_kind=task.eval.kind)


def build_probe_data(probes, seed: int) -> list:
    """Each data probe's eval examples (``None`` for an lm-eval probe), loaded like a task's eval set.

    Probes (``probes:`` in the recipe) are evaluated, never trained; errors name ``probes[i]``.
    """
    probe_data = []
    for index, probe in enumerate(probes):
        if probe.data is None:
            probe_data.append(None)
            continue
        where = f"probes[{index}]"
        rows = load_rows(probe.data, default_split="test", where=f"{where}.data")
        rows = seeded_subset(rows, probe.eval.max_examples, seed)
        formatter = RowFormatter(probe, where)  # reads probe.fields, as it reads a task's
        make = formatter.choice_example if probe.eval.kind == "choice" else formatter.generation_example
        examples = [make(row) for row in rows]
        if not examples:
            raise CptError(f"{where}.data: no eval examples")
        probe_data.append(TaskData(name=probe.name, train=None, eval_examples=examples, eval_kind=probe.eval.kind))
    return probe_data
