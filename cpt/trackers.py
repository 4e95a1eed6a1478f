"""One step axis for a whole task sequence in the ``report_to`` trackers (TensorBoard, W&B, trackio, …).

Every task's trainer starts again at ``global_step`` 0, so in a tracker the loss, geometry
and integration series of task 2 would land on the steps of task 1. cpt's trackers count
optimizer steps across the sequence instead: task t's step s is logged at

    offset_t + s,    offset_t = optimizer steps of tasks 1 … t−1,

and row t of the accuracy matrix at ``offset_(t+1)`` (the step task t ended; row 0, the base,
at 0). The offsets come from the run's manifest (each task's record keeps its
``optimizer_steps``), so a resumed run continues the same axis. The trainer itself (its
``state.global_step``, ``log_history`` and checkpoints) keeps each task's own steps.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["STEPS_KEY", "is_tracker", "offset_tracker_steps", "sequence_step"]

#: A task record's key (``manifest.json``) holding the optimizer steps its trainer ran.
STEPS_KEY = "optimizer_steps"


def sequence_step(records: Sequence[dict[str, Any]], max_steps: Sequence[int | None]) -> int:
    """The optimizer steps of the tasks whose manifest ``records`` are given (tasks 1 … k): the
    tracker step at which task k ended, the offset of task k+1.

    A record without ``optimizer_steps`` (a run directory from before cpt recorded it) counts
    as its task's ``max_steps`` (``max_steps[i]``) when that is positive, else 0.
    """
    total = 0
    for record, limit in zip(records, max_steps, strict=True):
        steps = record.get(STEPS_KEY)
        if steps is None:
            steps = limit if limit is not None and limit > 0 else 0
        total += int(steps)
    return total


def is_tracker(callback: Any) -> bool:
    """Whether ``callback`` is one of transformers' ``report_to`` integrations (TensorBoard, W&B, …)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return isinstance(callback, tuple(INTEGRATION_TO_CALLBACK.values()))


def offset_tracker_steps(callbacks: Iterable[Any], offset: int) -> None:
    """Make every tracker among ``callbacks`` (:func:`is_tracker`) see ``state.global_step + offset``.

    Each of its event methods is replaced, on the instance, by one that passes a shallow copy
    of the trainer's state with the shifted step; the trainer, its state and every other
    callback (e.g. those comparing ``state.global_step`` with their own records) are unchanged,
    and the instance keeps its class (``isinstance`` checks, the trainer's callback lookups).
    Calling it again replaces the offset.
    """
    from transformers import TrainerCallback

    events = [name for name in vars(TrainerCallback) if name.startswith("on_")]  # every event a tracker may read
    for callback in callbacks:
        if not is_tracker(callback):
            continue
        for event in events:
            method = getattr(type(callback), event).__get__(callback)  # the class's, never an earlier shift
            if offset:
                setattr(callback, event, functools.partial(_with_shifted_step, method, offset))
            else:
                callback.__dict__.pop(event, None)


def _with_shifted_step(method, offset: int, args, state, control, **kwargs):
    shifted = copy.copy(state)
    shifted.global_step = state.global_step + offset
    return method(args, shifted, control, **kwargs)
