"""Replay (METHOD §4): train task t on its own examples plus buffered examples of tasks < t.

Buffers. When task t's training set is prepared (:meth:`Replay.prepare_train_dataset`,
before training starts), a seeded uniform sample of task t's own training examples is
written to ``<strategy_dir>/replay/<task>.jsonl`` (atomically): ``buffer_size`` examples,
or ``buffer_fraction`` of the task's examples. The sample depends only on the run's seed,
the task's index and its data, never on the model, so writing it before training is
deterministic and survives a kill at any later moment; a rerun finds the file and keeps
it. The rows are the task's formatted ``prompt``/``completion`` rows exactly, so a replayed
example is tokenized by TRL exactly like it was when its task was trained.

Mixture. Task t trains on its n own examples plus ``k = round(ratio · n)`` replayed ones
(``ratio`` = replayed : new), read back from the buffers of *all* earlier tasks and
stratified: each of the t−1 earlier tasks gives ⌊k/(t−1)⌋ examples and the remainder
goes one each to the oldest tasks. A task's share is drawn from a seeded permutation of
its buffer (seed, t and the earlier task's index), cycling through the buffer when the
share is larger than the buffer. The mixed set is shuffled with a seeded generator. Only
the buffers are ever read back, so memory stays bounded by ``buffer_size`` per task, and a
rerun after a kill (or a new :class:`Replay` instance) builds the identical mixture.

Integration is sequential: θ_t = E_t, trained from θ_{t−1}.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import datasets
from pydantic import Field

from cpt.errors import CptError
from cpt.integration import IntegrationContext, TaskContext
from cpt.io import atomic_write_text
from cpt.strategies import Strategy, register_strategy

COLUMNS = ("prompt", "completion")


@dataclass
class ReplayParams:
    buffer_size: Annotated[int, Field(gt=0)] = 64
    """Examples kept per finished task (a seeded uniform sample of its training set)."""
    buffer_fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    """Keep this fraction of each task's examples instead of ``buffer_size`` (at least one)."""
    ratio: Annotated[float, Field(ge=0)] = 0.1
    """Replayed : new examples in the training set of tasks 2, 3, ... (stratified across earlier tasks)."""


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def buffer_count(params: ReplayParams, available: int) -> int:
    """How many of a task's ``available`` examples its buffer keeps."""
    wanted = (
        params.buffer_size
        if params.buffer_fraction is None
        else max(1, round_half_up(params.buffer_fraction * available))
    )
    return min(wanted, available)


def stratified_counts(total: int, groups: int) -> list[int]:
    """``total`` split over ``groups`` as equally as possible; the remainder to the first (oldest) groups."""
    if groups <= 0:
        return []
    share, remainder = divmod(total, groups)
    return [share + (1 if index < remainder else 0) for index in range(groups)]


def sample_buffer(rows: list[dict[str, Any]], count: int, seed: int, step: int) -> list[dict[str, Any]]:
    """A seeded uniform sample of ``count`` rows, kept in their original order."""
    keep = sorted(random.Random(f"cpt-replay-buffer:{seed}:{step}").sample(range(len(rows)), count))
    return [rows[index] for index in keep]


def draw(buffer: list[dict[str, Any]], count: int, seed: int, step: int, source_step: int) -> list[dict[str, Any]]:
    """``count`` examples of one buffer for task ``step``: a seeded permutation, cycled if needed."""
    if count and not buffer:
        raise CptError(f"replay: the buffer of task {source_step} is empty")
    order = list(range(len(buffer)))
    random.Random(f"cpt-replay-draw:{seed}:{step}:{source_step}").shuffle(order)
    return [buffer[order[index % len(order)]] for index in range(count)]


def prompt_completion_rows(dataset: datasets.Dataset, strategy: str, task_name: str, why: str) -> list[dict[str, Any]]:
    """The training set's rows as the buffers keep them (prompt and completion only).

    A set without those columns is a `CptError` naming ``strategy``, the task, the missing columns and ``why``
    the strategy needs them.
    """
    missing = [column for column in COLUMNS if column not in dataset.column_names]
    if missing:
        raise CptError(f"{strategy}: task {task_name!r} has no {', '.join(missing)} column(s); {why}")
    return dataset.select_columns(list(COLUMNS)).to_list()


def _is_conversational(row: dict[str, Any]) -> bool:
    return isinstance(row["prompt"], list)


class ReplayBuffers:
    """The ``replay/<task>.jsonl`` files of a run (one JSON row per buffered example)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, task_name: str) -> Path:
        return self.folder / f"{task_name}.jsonl"

    def write(self, task_name: str, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path(task_name), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

    def read(self, task_name: str) -> list[dict[str, Any]]:
        path = self.path(task_name)
        if not path.is_file():
            raise CptError(
                f"replay: the buffer of task {task_name!r} ({path}) is missing; "
                "it is written when that task is prepared. "
                "The run directory is incomplete: rerun with --overwrite"
            )
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


@register_strategy(
    "replay",
    params=ReplayParams,
    train_from="state",
    state_is_expert=True,
    description="sequential fine-tuning with a buffer of each task's examples replayed in later tasks",
)
class Replay(Strategy):
    def __init__(self, params: ReplayParams):
        super().__init__(params)
        self.mixture: dict[str, Any] = {}
        """What the last prepared training set holds: own examples and replayed ones per earlier task."""

    def buffers(self, context: TaskContext) -> ReplayBuffers:
        return ReplayBuffers(Path(context.strategy_dir) / "replay")

    def prepare_train_dataset(self, context: TaskContext) -> datasets.Dataset:
        """Write task t's buffer (if not there yet) and return its examples mixed with replayed ones."""
        own = context.train_dataset
        own_rows = prompt_completion_rows(own, "replay", context.task_name, "replay mixes prompt/completion rows")
        buffers = self.buffers(context)
        if not buffers.path(context.task_name).is_file():
            buffers.write(
                context.task_name,
                sample_buffer(own_rows, buffer_count(self.params, len(own_rows)), context.seed, context.step),
            )

        earlier = context.task_names[: context.step - 1]
        total = round_half_up(self.params.ratio * len(own_rows)) if earlier else 0
        counts = stratified_counts(total, len(earlier))
        self.mixture = {"own_examples": len(own_rows), "replayed_examples": dict(zip(earlier, counts))}
        if total == 0:
            return own
        replayed: list[dict[str, Any]] = []
        for source_step, (name, count) in enumerate(zip(earlier, counts), start=1):
            replayed += draw(buffers.read(name), count, context.seed, context.step, source_step)

        own_format = _is_conversational(own_rows[0]) if own_rows else None
        for row in replayed:
            if _is_conversational(row) != own_format:
                kinds = {True: "conversational (chat)", False: "plain text"}
                raise CptError(
                    f"replay: task {context.task_name!r} is {kinds[own_format]} but a replayed example of an "
                    f"earlier task is {kinds[not own_format]}; TRL trains one format per dataset, so give all "
                    "tasks the same format (fields.chat)"
                )
        mixture = own_rows + replayed
        random.Random(f"cpt-replay-mix:{context.seed}:{context.step}").shuffle(mixture)
        return datasets.Dataset.from_list(mixture)

    def integrate(self, context: IntegrationContext) -> dict:
        context.write_state_from_model()
        return dict(self.mixture)


__all__ = ["Replay", "ReplayBuffers", "ReplayParams", "buffer_count", "draw", "sample_buffer", "stratified_counts"]
