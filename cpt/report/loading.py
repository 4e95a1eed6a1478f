"""Reading a run directory (DESIGN.md) into a :class:`RunData`: manifest, accuracy matrix, geometry, integration.

:func:`load_run` reads ``manifest.json``, ``eval/matrix.json``, ``geometry/<t>_<task>.json``
and ``integration/<t>_<task>.json``, and keeps what exists: a run in progress gives the rows
of its completed tasks, a run without geometry files an empty :attr:`RunData.geometry`.
Unreadable step files are skipped with a note (:attr:`RunData.notes`); an unreadable
manifest or matrix is a one-line :class:`~cpt.errors.CptError`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpt.errors import CptError
from cpt.evaluation.continual import continual_metrics
from cpt.naming import tensor_family

TOP_K = 5
"""Conflicting tensors listed per step (:attr:`StepGeometry.top`)."""
_STEP_FILE = re.compile(r"^(\d+)_(.+)\.json$")
"""``<t>_<task>.json`` in ``geometry/`` and ``integration/``."""


@dataclass
class StepGeometry:
    """What the report uses of ``geometry/<t>_<task>.json``."""

    step: int
    task: str
    mean_conflict: float | None
    by_family: dict[str, float | None]
    top: list[tuple[str, float]]
    mean_norm: float | None
    per_tensor_conflict: dict[str, float | None]
    count: int | None = None
    undefined: int | None = None
    mean_sar: float | None = None
    """Mean over target tensors of SAR(Δ_t → state) (``aggregates.sar_update_to_state``; METHOD §1)."""


@dataclass
class RunData:
    """A run directory as the report sees it (see :func:`load_run`)."""

    root: Path
    manifest: dict
    task_names: list[str]
    rows: list[list[float | None]]
    """R rows 0..k (k = last evaluated step); a row not evaluated is all ``None``."""
    expert_scores: list[float | None]
    metrics: dict
    geometry: dict[int, StepGeometry] = field(default_factory=dict)
    integration: dict[int, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    probe_names: list[str] = field(default_factory=list)
    """The recipe's probes (eval-only tasks); empty for a run without them or from before them."""
    probe_rows: list[list[float | None]] = field(default_factory=list)
    """Probe scores aligned with :attr:`rows` (one column per probe; a row not evaluated is all ``None``)."""

    @property
    def general_ability(self) -> dict | None:
        """:func:`cpt.evaluation.general_ability_kept` of the probes, ``None`` without probes."""
        if not self.probe_names:
            return None
        from cpt.evaluation.continual import general_ability_kept

        return general_ability_kept(self.probe_rows, self.probe_names)

    @property
    def name(self) -> str:
        return str(self.manifest.get("run_name") or self.root.name)

    @property
    def strategy(self) -> str:
        return str(self.manifest.get("strategy") or "?")

    @property
    def num_completed(self) -> int:
        return max(len(self.rows) - 1, 0)

    def task_record(self, step: int) -> dict:
        tasks = self.manifest.get("tasks") or []
        return tasks[step - 1] if 0 < step <= len(tasks) and isinstance(tasks[step - 1], dict) else {}

    def seconds(self, step: int, key: str) -> float | None:
        value = self.task_record(step).get(f"{key}_seconds")
        if value is None and key == "integration":
            value = self.integration.get(step, {}).get("seconds")
        return float(value) if isinstance(value, (int, float)) else None

    def total_seconds(self, key: str) -> float | None:
        values = [
            seconds for step in range(1, len(self.task_names) + 1) if (seconds := self.seconds(step, key)) is not None
        ]
        return sum(values) if values else None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CptError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})") from None


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite int or float (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _per_tensor(report: dict) -> dict[str, dict]:
    """``per_tensor`` as {name: fields}; accepts the dict form and a list of records."""
    raw = report.get("per_tensor")
    if isinstance(raw, dict):
        return {str(name): fields for name, fields in raw.items() if isinstance(fields, dict)}
    if isinstance(raw, list):
        out = {}
        for record in raw:
            if isinstance(record, dict) and (name := record.get("tensor") or record.get("name")):
                out[str(name)] = record
        return out
    return {}


def _aggregate_mean(report: dict, key: str, per_tensor: dict[str, dict]) -> float | None:
    aggregate = (report.get("aggregates") or {}).get(key)
    if isinstance(aggregate, dict) and "mean" in aggregate:
        return finite_number(aggregate.get("mean"))
    return _mean([finite_number(fields.get(key)) for fields in per_tensor.values()])


def _step_geometry(step: int, task: str, report: dict) -> StepGeometry:
    per_tensor = _per_tensor(report)
    conflicts = {name: finite_number(fields.get("geometry_conflict")) for name, fields in per_tensor.items()}
    aggregate = (report.get("aggregates") or {}).get("geometry_conflict") or {}
    by_family = aggregate.get("by_family") if isinstance(aggregate.get("by_family"), dict) else None
    if by_family is None:
        groups: dict[str, list[float]] = {}
        for name, value in conflicts.items():
            if value is not None:
                groups.setdefault(tensor_family(name), []).append(value)
        by_family = {family: _mean(values) for family, values in groups.items()}
    ranked = sorted(
        ((name, value) for name, value in conflicts.items() if value is not None), key=lambda item: -item[1]
    )
    if not ranked and isinstance(aggregate.get("top"), list):
        ranked = [
            (str(entry.get("tensor")), value)
            for entry in aggregate["top"]
            if isinstance(entry, dict) and (value := finite_number(entry.get("geometry_conflict"))) is not None
        ]
    defined = [value for value in conflicts.values() if value is not None]
    return StepGeometry(
        step=step,
        task=str(report.get("task") or task),
        mean_conflict=_aggregate_mean(report, "geometry_conflict", per_tensor),
        by_family={str(family): finite_number(value) for family, value in by_family.items()},
        top=ranked[:TOP_K],
        mean_norm=_aggregate_mean(report, "norm_update", per_tensor),
        per_tensor_conflict=conflicts,
        count=aggregate.get("count", len(defined) if per_tensor else None),
        undefined=aggregate.get("undefined", (len(conflicts) - len(defined)) if per_tensor else None),
        mean_sar=_aggregate_mean(report, "sar_update_to_state", per_tensor),
    )


def _read_step_files(folder: Path, task_names: list[str], what: str, notes: list[str]) -> dict[int, tuple[str, dict]]:
    found: dict[int, tuple[str, dict]] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.json")):
        match = _STEP_FILE.match(path.name)
        if not match:
            continue
        step, task = int(match.group(1)), match.group(2)
        try:
            content = _read_json(path, what)
        except CptError as exc:
            notes.append(f"skipped {path.relative_to(folder.parent)}: {exc}")
            continue
        if not isinstance(content, dict):
            notes.append(f"skipped {path.relative_to(folder.parent)}: not a JSON object")
            continue
        if isinstance(content.get("step"), int):
            step = content["step"]
        expected = task_names[step - 1] if 0 < step <= len(task_names) else None
        if step in found and found[step][0] == expected and task != expected:
            continue  # keep the file of the task the manifest names
        found[step] = (task, content)
    return found


def _matrix_rows(raw_rows: Any, num_tasks: int, path: Path) -> list[list[float | None]]:
    """Rows 0..k of ``matrix.json`` (k the last present row); rows in between not evaluated → all None."""
    if not isinstance(raw_rows, list):
        raise CptError(f"{path}: 'rows' is not a list; the file is not a cpt accuracy matrix")
    last = max((i for i, row in enumerate(raw_rows) if row is not None), default=-1)
    rows = []
    for i in range(last + 1):
        row = raw_rows[i]
        if row is None:
            rows.append([None] * num_tasks)
        elif not isinstance(row, list) or len(row) != num_tasks:
            raise CptError(
                f"{path}: row {i} has {len(row) if isinstance(row, list) else 'no'} entries for {num_tasks} tasks"
            )
        else:
            rows.append([finite_number(score) for score in row])
    return rows


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read a run directory; :class:`CptError` (one line) if it is not one."""
    root = Path(run_dir)
    if not root.is_dir():
        raise CptError(f"{root} is not a folder; give a cpt run directory (runs/<name>/ with manifest.json)")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise CptError(f"{root} is not a cpt run directory: it has no manifest.json (give runs/<name>/)")
    manifest = _read_json(manifest_path, "run manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tasks"), list):
        raise CptError(f"{manifest_path} is not a cpt run manifest (no 'tasks' list)")
    notes: list[str] = []
    matrix_path = root / "eval" / "matrix.json"
    matrix = _read_json(matrix_path, "accuracy matrix") if matrix_path.is_file() else None
    if matrix is not None and not isinstance(matrix, dict):
        raise CptError(f"{matrix_path} is not a cpt accuracy matrix (expected a JSON object)")
    manifest_tasks = [str(task.get("name")) for task in manifest["tasks"] if isinstance(task, dict)]
    task_names = [str(t) for t in (matrix or {}).get("tasks") or manifest_tasks]
    num_tasks = len(task_names)
    rows = _matrix_rows(matrix.get("rows", []), num_tasks, matrix_path) if matrix else []
    experts_raw = (matrix or {}).get("expert_scores")
    experts = (
        [finite_number(score) for score in experts_raw]
        if isinstance(experts_raw, list) and len(experts_raw) == num_tasks
        else [None] * num_tasks
    )
    metrics = continual_metrics(rows, experts) if rows else {}

    geometry = {
        step: _step_geometry(step, task, content)
        for step, (task, content) in _read_step_files(root / "geometry", task_names, "geometry report", notes).items()
    }
    integration = {
        step: content
        for step, (_, content) in _read_step_files(root / "integration", task_names, "integration stats", notes).items()
    }
    probe_names, probe_rows = _probe_columns(matrix or {}, len(rows), matrix_path)
    return RunData(
        root, manifest, task_names, rows, experts, metrics, geometry, integration, notes, probe_names, probe_rows
    )


def _probe_columns(matrix: dict, num_rows: int, path: Path) -> tuple[list[str], list[list[float | None]]]:
    """``probes`` and ``probe_rows`` of ``matrix.json`` aligned with its task rows; none in a matrix without probes."""
    names = matrix.get("probes")
    if not isinstance(names, list) or not names:
        return [], []
    names = [str(name) for name in names]
    raw = matrix.get("probe_rows") if isinstance(matrix.get("probe_rows"), list) else []
    rows = []
    for i in range(num_rows):
        row = raw[i] if i < len(raw) else None
        if row is None:
            rows.append([None] * len(names))
        elif not isinstance(row, list) or len(row) != len(names):
            raise CptError(
                f"{path}: probe row {i} has {len(row) if isinstance(row, list) else 'no'} entries for {len(names)} probes"
            )
        else:
            rows.append([finite_number(score) for score in row])
    return names, rows
