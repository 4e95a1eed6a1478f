"""What the callbacks share: one vocabulary, and where a task's step, name and previous state come from.

The words (the same in every callback):

* ``base`` — θ0: a local HF folder or a hub id (resolved to a local snapshot of its
  ``*.json``/``*.safetensors`` files, see :func:`cpt.tensors.local_model_folder`).
* ``state_dir`` — the state folder: θ_{t−1} while task t trains, θ_t once it is integrated.
  Its ``cpt_state.json`` marker (``{"step", "task"}``, written with every state) says which
  step it holds.
* ``previous_state_dir`` — θ_{t−1} when it is somewhere else than ``state_dir`` (rare).
* ``train_from`` — what the expert trained from: ``"state"`` (θ_{t−1}) or ``"base"`` (θ0).
* ``targets`` — regexes of the tensors to look at (default :data:`cpt.recipe.DEFAULT_TARGETS`).
* ``output_dir`` — the folder a callback writes its own files to.
* ``step`` / ``task_name`` — the 1-based task index t and the task's name. One callback
  instance serves a whole sequence of tasks: both are worked out anew at every
  ``on_train_begin`` (:func:`resolve_task`); pass them only to override that.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt.errors import CptError
from cpt.tensors import read_marker

TRAIN_FROM = ("state", "base")


def renamed_keyword(callback: str, old: str, new: str, old_value: Any, new_value: Any) -> Any:
    """The value of ``new``, accepting the deprecated keyword ``old`` for one release (with a DeprecationWarning)."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise CptError(f"{callback}: pass {new}= only ({old}= is its deprecated old name)")
    warnings.warn(f"{callback}({old}=...) is deprecated; use {new}=", DeprecationWarning, stacklevel=3)
    return old_value


def check_train_from(callback: str, train_from: str) -> str:
    if train_from not in TRAIN_FROM:
        raise CptError(f"{callback}: train_from must be 'state' (θ_(t-1)) or 'base' (θ0), got {train_from!r}")
    return train_from


@dataclass(frozen=True)
class TaskPosition:
    """Where in the sequence the task being trained is."""

    step: int
    """1-based index t of the task."""
    task_name: str
    previous_state_dir: Path | None
    """The folder of θ_{t−1}; None when the previous state is the base θ0 (t = 1)."""


def resolve_task(
    args: Any,
    *,
    state_dir: Path | None,
    step: int | None = None,
    task_name: str | None = None,
    previous_state_dir: Path | None = None,
) -> TaskPosition:
    """The step, name and previous state of the task a trainer is about to train (or just trained).

    * ``step``: the explicit value, else one more than the step in ``state_dir``'s marker,
      else 1 (no state yet: the first task).
    * ``task_name``: the explicit value, else the trainer's ``args.run_name`` when set,
      else ``task<step>``.
    * ``previous_state_dir``: the explicit folder, else ``state_dir`` when t > 1 and it holds
      a model (a ``config.json``), else None (θ0).
    """
    marker = read_marker(state_dir) if state_dir is not None else None
    if step is None:
        step = int(marker["step"]) + 1 if marker else 1
    if step < 1:
        raise CptError(f"step must be ≥ 1 (got {step})")
    if task_name is None:
        task_name = getattr(args, "run_name", None) or f"task{step}"
    if previous_state_dir is None and step > 1 and state_dir is not None and (state_dir / "config.json").exists():
        previous_state_dir = state_dir
    return TaskPosition(step, task_name, previous_state_dir)


class SequencePosition:
    """Where a callback is in the task sequence: explicit ``step``/``task_name``/``previous_state_dir``
    overrides, else (at ``on_train_begin``) the state folder's marker (:func:`resolve_task`)."""

    def _init_position(self, step: int | None, task_name: str | None, previous_state_dir) -> None:
        self._overrides = {
            "step": step,
            "task_name": task_name,
            "previous_state_dir": Path(previous_state_dir) if previous_state_dir else None,
        }
        #: The task at hand (set at ``on_train_begin``, or from the overrides until then).
        self.step = step if step is not None else 1
        self.task_name = task_name if task_name is not None else f"task{self.step}"
        self.previous_state_dir: Path | None = self._overrides["previous_state_dir"]
        self._position: TaskPosition | None = None
