"""Reports of continual runs: ``RUN_DIR/report.md`` + ``RUN_DIR/plots/*.png``, and run comparisons.

:func:`write_report` reads a run directory (DESIGN.md) — ``manifest.json``,
``eval/matrix.json``, ``geometry/<t>_<task>.json``, ``integration/<t>_<task>.json`` — and
writes what exists: a run in progress gets a report of its completed tasks, a run without
geometry files gets one without the conflict sections. Plots:

* ``plots/accuracy_matrix.png`` — R[i][j] heatmap (rows base / after each task, one column
  per task, values annotated, entries not evaluated yet blank);
* ``plots/task_scores.png`` — each task's score across steps (one line per task);
* ``plots/conflict_per_tensor.png`` — per-tensor state-relative conflict (METHOD §1),
  tensors × steps, attention tensors then MLP tensors, each ordered by depth; undefined
  values (e.g. step 1, where θ_{t−1} = θ0) blank;
* ``plots/conflict_vs_forgetting.png`` — the forgetting caused by a step against that
  step's mean state-relative conflict, beside the same against its mean ``‖Δ‖``, each with
  Spearman's ρ and its p-value.

**Conflict-vs-forgetting pairs** (the claim of METHOD §1). One pair per (step t, earlier
task j) with 2 ≤ t ≤ k (k = tasks evaluated so far) and 1 ≤ j < t, when both R[t−1][j]
and R[t][j] are present:

* ``y = R[t−1][j] − R[t][j]`` — the drop in task j's score caused by step t (positive =
  forgetting; row 0 is the base, so at t = 2, j = 1 this is R[1][1] − R[2][1]);
* ``x = c_t``, the mean over target tensors of the state-relative conflict
  ``GC(θ_{t−1} − θ0, Δ_t)`` of step t (``aggregates.geometry_conflict.mean`` of
  ``geometry/<t>_<task>.json``, or the mean of its defined per-tensor values);
* for the ``‖Δ‖`` baseline, ``x = n_t``, the mean over target tensors of ``‖Δ_t‖_F``
  (``aggregates.norm_update.mean``, or the per-tensor mean).

Spearman's ρ and its two-sided p-value are ``scipy.stats.spearmanr(x, y)`` over the pairs
whose x is defined (each signal separately; both come from the same geometry file, so
the pairs normally coincide). All pairs of one step share its x, so x has ties; scipy
ranks ties by their average. Fewer than 3 pairs → "not enough points"; a constant x or y
→ ρ undefined.

:func:`compare_runs` puts several runs in one table (``compare.md``) and one bar chart
(``compare.png``: ACC and forgetting per run).

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend change). Every file is written atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpt.errors import CptError
from cpt.evaluation.continual import continual_metrics, format_matrix_table
from cpt.io import atomic_write_text
from cpt.naming import tensor_depth, tensor_family

PLOTS = "plots"
MATRIX_PLOT = "accuracy_matrix.png"
SCORES_PLOT = "task_scores.png"
TENSOR_PLOT = "conflict_per_tensor.png"
SCATTER_PLOT = "conflict_vs_forgetting.png"
REPORT_PLOTS = (MATRIX_PLOT, SCORES_PLOT, TENSOR_PLOT, SCATTER_PLOT)
MIN_PAIRS = 3
TOP_K = 5

# Tensors in the conflict heatmap: attention, then MLP, then the rest (cpt.naming's families).
_FAMILY_ORDER = {"attention": 0, "mlp": 1, "other": 2}
_MODULE_ORDER = {name: i for i, name in enumerate(
    ["q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "gate_proj", "up_proj", "down_proj"]
)}
_GEOMETRY_FILE = re.compile(r"^(\d+)_(.+)\.json$")


def _module(name: str) -> str:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
        return parts[-2]
    return parts[-1]


def tensor_order_key(name: str) -> tuple:
    """Attention before MLP before other; then depth; then q, k, v, o / gate, up, down."""
    depth = tensor_depth(name)
    module = _module(name)
    return (_FAMILY_ORDER[tensor_family(name)], depth is None, depth or 0, _MODULE_ORDER.get(module, len(_MODULE_ORDER)), name)


def short_tensor_name(name: str) -> str:
    depth = tensor_depth(name)
    return f"L{depth} {_module(name)}" if depth is not None else name.removesuffix(".weight")


# ---------------------------------------------------------------------- reading a run
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


@dataclass
class RunData:
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
        values = [s for step in range(1, len(self.task_names) + 1) if (s := self.seconds(step, key)) is not None]
        return sum(values) if values else None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CptError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})") from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
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
        return _number(aggregate.get("mean"))
    return _mean([_number(fields.get(key)) for fields in per_tensor.values()])


def _step_geometry(step: int, task: str, report: dict) -> StepGeometry:
    per_tensor = _per_tensor(report)
    conflicts = {name: _number(fields.get("geometry_conflict")) for name, fields in per_tensor.items()}
    aggregate = (report.get("aggregates") or {}).get("geometry_conflict") or {}
    by_family = aggregate.get("by_family") if isinstance(aggregate.get("by_family"), dict) else None
    if by_family is None:
        groups: dict[str, list[float]] = {}
        for name, value in conflicts.items():
            if value is not None:
                groups.setdefault(tensor_family(name), []).append(value)
        by_family = {family: _mean(values) for family, values in groups.items()}
    ranked = sorted(((n, v) for n, v in conflicts.items() if v is not None), key=lambda item: -item[1])
    if not ranked and isinstance(aggregate.get("top"), list):
        ranked = [(str(e.get("tensor")), v) for e in aggregate["top"] if isinstance(e, dict) and (v := _number(e.get("geometry_conflict"))) is not None]
    defined = [v for v in conflicts.values() if v is not None]
    return StepGeometry(
        step=step,
        task=str(report.get("task") or task),
        mean_conflict=_aggregate_mean(report, "geometry_conflict", per_tensor),
        by_family={str(k): _number(v) for k, v in by_family.items()},
        top=ranked[:TOP_K],
        mean_norm=_aggregate_mean(report, "norm_update", per_tensor),
        per_tensor_conflict=conflicts,
        count=aggregate.get("count", len(defined) if per_tensor else None),
        undefined=aggregate.get("undefined", (len(conflicts) - len(defined)) if per_tensor else None),
    )


def _read_step_files(folder: Path, task_names: list[str], what: str, notes: list[str]) -> dict[int, tuple[str, dict]]:
    found: dict[int, tuple[str, dict]] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.json")):
        match = _GEOMETRY_FILE.match(path.name)
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
            raise CptError(f"{path}: row {i} has {len(row) if isinstance(row, list) else 'no'} entries for {num_tasks} tasks")
        else:
            rows.append([_number(x) for x in row])
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
    manifest_tasks = [str(t.get("name")) for t in manifest["tasks"] if isinstance(t, dict)]
    task_names = [str(t) for t in (matrix or {}).get("tasks") or manifest_tasks]
    num_tasks = len(task_names)
    rows = _matrix_rows(matrix.get("rows", []), num_tasks, matrix_path) if matrix else []
    experts_raw = (matrix or {}).get("expert_scores")
    experts = [_number(x) for x in experts_raw] if isinstance(experts_raw, list) and len(experts_raw) == num_tasks else [None] * num_tasks
    metrics = continual_metrics(rows, experts) if rows else {}

    geometry = {
        step: _step_geometry(step, task, content)
        for step, (task, content) in _read_step_files(root / "geometry", task_names, "geometry report", notes).items()
    }
    integration = {step: content for step, (_, content) in _read_step_files(root / "integration", task_names, "integration stats", notes).items()}
    return RunData(root, manifest, task_names, rows, experts, metrics, geometry, integration, notes)


# ---------------------------------------------------------------------- conflict vs forgetting
@dataclass
class ForgettingPair:
    step: int
    """t: the step whose update is measured."""
    task: int
    """j < t: the earlier task (1-based)."""
    drop: float
    """R[t−1][j] − R[t][j]."""
    conflict: float | None
    norm: float | None


@dataclass
class Correlation:
    n: int
    rho: float | None = None
    pvalue: float | None = None
    reason: str | None = None
    """Why ρ is undefined (``None`` when it is defined)."""

    def describe(self) -> str:
        if self.rho is None:
            return f"{self.reason} (n = {self.n})"
        return f"ρ = {self.rho:.4f}, p = {self.pvalue:.4g} (n = {self.n})"


def forgetting_pairs(rows: Sequence[Sequence[float | None]], geometry: dict[int, StepGeometry]) -> list[ForgettingPair]:
    """The (step, earlier task) pairs defined in the module docstring, in step then task order."""
    pairs = []
    for t in range(2, len(rows)):
        step = geometry.get(t)
        for j in range(1, t):
            before, after = rows[t - 1][j - 1], rows[t][j - 1]
            if before is None or after is None:
                continue
            pairs.append(ForgettingPair(t, j, before - after, step.mean_conflict if step else None, step.mean_norm if step else None))
    return pairs


def spearman(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """``scipy.stats.spearmanr`` with the report's rules: n ≥ 3, non-constant inputs."""
    n = len(x)
    if n < MIN_PAIRS:
        return Correlation(n, reason=f"not enough points: {MIN_PAIRS} pairs needed")
    if len(set(x)) < 2 or len(set(y)) < 2:
        which = "the signal" if len(set(x)) < 2 else "the forgetting"
        return Correlation(n, reason=f"undefined: {which} is constant across the pairs")
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = spearmanr(x, y)
    rho, pvalue = float(result.statistic), float(result.pvalue)
    if not math.isfinite(rho):
        return Correlation(n, reason="undefined")
    return Correlation(n, rho, pvalue)


def correlations(pairs: Sequence[ForgettingPair]) -> dict[str, Correlation]:
    """Spearman of the drop against the step's mean conflict and against its mean ‖Δ‖."""
    out = {}
    for key in ("conflict", "norm"):
        used = [(getattr(p, key), p.drop) for p in pairs if getattr(p, key) is not None]
        out[key] = spearman([x for x, _ in used], [y for _, y in used])
    return out


# ---------------------------------------------------------------------- plotting
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save_png(fig, path: Path) -> None:
    """Save through a temporary file in the same folder + rename (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _masked(values: list[list[float | None]]):
    import numpy as np

    array = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    return np.ma.masked_invalid(array)


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="white")


def plot_accuracy_matrix(data: RunData, path: Path) -> None:
    T = len(data.task_names)
    values = [list(row) for row in data.rows] + [[None] * T for _ in range(T + 1 - len(data.rows))]
    labels = ["base"] + [f"after {name}" for name in data.task_names]
    present = [v for row in values for v in row if v is not None]
    unit = all(0.0 <= v <= 1.0 for v in present)
    fig = _figure(max(4.5, 1.1 * T + 2.5), max(3.0, 0.5 * (T + 1) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(_masked(values), cmap=_cmap("viridis"), vmin=0.0 if unit else None, vmax=1.0 if unit else None, aspect="auto")
    lo, hi = (0.0, 1.0) if unit else (min(present, default=0.0), max(present, default=1.0))
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v is not None:
                light = (v - lo) / (hi - lo or 1.0) > 0.6
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9, color="black" if light else "white")
    ax.set_xticks(range(T), data.task_names, rotation=30 if T > 4 else 0, ha="right" if T > 4 else "center")
    ax.set_yticks(range(T + 1), labels)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("state")
    done = f" (after {data.num_completed} of {T} tasks)" if data.num_completed < T else ""
    ax.set_title(f"{data.name}: accuracy matrix R[i][j]{done}", fontsize=10)
    fig.colorbar(image, ax=ax, label="score")
    _save_png(fig, path)


def plot_task_scores(data: RunData, path: Path) -> None:
    T = len(data.task_names)
    fig = _figure(max(5.0, 0.9 * T + 3.5), 3.8)
    ax = fig.add_subplot()
    steps = list(range(len(data.rows)))
    for j, name in enumerate(data.task_names):
        points = [(i, data.rows[i][j]) for i in steps if data.rows[i][j] is not None]
        if not points:
            continue
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        learnt = [p for p in points if p[0] == j + 1]
        if learnt:  # the point right after the task is learnt
            ax.plot([learnt[0][0]], [learnt[0][1]], marker="*", markersize=14, color=line.get_color())
    ax.set_xticks(range(T + 1), ["base"] + [f"after {n}" for n in data.task_names], rotation=30 if T > 3 else 0, ha="right" if T > 3 else "center")
    ax.set_xlim(-0.3, T + 0.3)
    ax.set_ylabel("score")
    ax.set_title(f"{data.name}: score of each task across steps (★ = just learnt)", fontsize=10)
    ax.grid(alpha=0.3)
    if data.task_names:
        ax.legend(fontsize=8, loc="best")
    _save_png(fig, path)


def plot_tensor_conflict(data: RunData, path: Path) -> None:
    steps = sorted(data.geometry)
    names = sorted({name for s in steps for name in data.geometry[s].per_tensor_conflict}, key=tensor_order_key)
    values = [[data.geometry[s].per_tensor_conflict.get(name) for s in steps] for name in names]
    n = len(names)
    dense = n > 40
    fig = _figure(max(4.5, 0.9 * len(steps) + 3.5), min(60.0, max(3.5, (0.13 if dense else 0.3) * n + 1.6)))
    ax = fig.add_subplot()
    image = ax.imshow(_masked(values), cmap=_cmap("magma"), aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(steps)), [f"{s}: {data.geometry[s].task}" for s in steps], rotation=30 if len(steps) > 4 else 0,
                  ha="right" if len(steps) > 4 else "center", fontsize=8)
    ax.set_yticks(range(n), [short_tensor_name(name) for name in names], fontsize=6 if dense else 8)
    if dense:  # a tall figure: step labels on top as well
        ax.tick_params(axis="x", labeltop=True, top=True)
    families = [tensor_family(name) for name in names]
    for i in range(1, n):
        if families[i] != families[i - 1]:
            ax.axhline(i - 0.5, color="cyan", linewidth=1.5)
    for family in dict.fromkeys(families):
        rows = [i for i, f in enumerate(families) if f == family]
        ax.text(1.02, (rows[0] + rows[-1]) / 2, "MLP" if family == "mlp" else family, transform=ax.get_yaxis_transform(),
                rotation=270, va="center", ha="left", fontsize=9)
    ax.set_xlabel("step t: task")
    ax.set_title(f"{data.name}: per-tensor state-relative conflict\nGC(θ_(t−1) − θ0, Δ_t); blank = undefined", fontsize=10)
    fig.colorbar(image, ax=ax, label="geometry conflict", pad=0.1)
    _save_png(fig, path)


def plot_conflict_vs_forgetting(data: RunData, pairs: list[ForgettingPair], stats: dict[str, Correlation], path: Path) -> None:
    fig = _figure(10.0, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    for ax, key, label in ((axes[0], "conflict", "mean state-relative conflict c_t"), (axes[1], "norm", "mean ‖Δ_t‖_F")):
        used = [p for p in pairs if getattr(p, key) is not None]
        for p in used:
            ax.scatter(getattr(p, key), p.drop, color=colours((p.step - 2) % 10), s=40, zorder=3)
            if len(used) <= 20:
                ax.annotate(f"t{p.step}→{data.task_names[p.task - 1]}", (getattr(p, key), p.drop), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.margins(x=0.15, y=0.12)
        ax.set_xlabel(label)
        ax.set_title(f"{'conflict' if key == 'conflict' else '‖Δ‖'}: {stats[key].describe()}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("forgetting of task j at step t\nR[t−1][j] − R[t][j]")
    fig.suptitle(f"{data.name}: forgetting vs state-relative conflict and vs update norm (Spearman)", fontsize=10)
    _save_png(fig, path)


# ---------------------------------------------------------------------- report.md
def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def render_report(data: RunData, plots: dict[str, str], pairs: list[ForgettingPair], stats: dict[str, Correlation]) -> str:
    """The text of ``report.md`` (``plots``: plot key → relative path of the PNGs written)."""
    m = data.manifest
    T = len(data.task_names)
    k = data.num_completed
    out = [f"# Run report: {_md(data.name)}", ""]
    out.append(f"- strategy: `{data.strategy}`")
    out.append(f"- recipe fingerprint: `{m.get('recipe_fingerprint', '?')}`")
    out.append(f"- status: {m.get('status', '?')} — {sum(1 for t in m['tasks'] if isinstance(t, dict) and t.get('status') == 'done')} of {T} tasks done")
    out.append(f"- tasks: {', '.join(f'{i}. {_md(n)}' for i, n in enumerate(data.task_names, 1))}")
    if m.get("created") or m.get("updated"):
        out.append(f"- created {m.get('created', '?')}, updated {m.get('updated', '?')}")
    versions = m.get("versions") or {}
    if versions:
        out.append("- versions: " + ", ".join(f"{key} {value}" for key, value in versions.items() if value != "not installed"))
    out.append("")

    out += ["## Accuracy matrix", ""]
    if not data.rows:
        out += ["No evaluation results yet (`eval/matrix.json` is missing or empty).", ""]
    else:
        out += ["R[i][j] = score of the state after task i on task j's eval set (row `base` = θ0; row `expert` = E_t on its own task t).", ""]
        out += ["```text", format_matrix_table(data.rows, data.task_names, data.expert_scores, data.metrics), "```", ""]
        if "matrix" in plots:
            out += [f"![accuracy matrix]({plots['matrix']})", ""]

        mt = data.metrics
        out += ["## Continual metrics (METHOD §5)", ""]
        if k < T:
            out += [f"Run in progress: metrics over the {k} task(s) learnt so far (FWT uses every row present).", ""]
        rows = [
            ["ACC", _fmt(mt.get("acc")), "mean_j R[k][j], j ≤ k"],
            ["BWT", _fmt(mt.get("bwt"), "+.3f"), "mean_{j<k} (R[k][j] − R[j][j])"],
            ["FWT", _fmt(mt.get("fwt"), "+.3f"), "mean_{j>1} (R[j−1][j] − R[0][j])"],
            ["forgetting", _fmt(mt.get("forgetting")), "mean_{j<k} (max_{i<k} R[i][j] − R[k][j])"],
            ["ACC over all tasks", _fmt(mt.get("acc_all_tasks")), "mean of row k over all T tasks"],
            ["expert ACC", _fmt(mt.get("expert_acc")), "mean_j E_j on task j, j ≤ k"],
            ["ACC / expert", _fmt(mt.get("normalized_acc")), "mean_j R[k][j] / E_j"],
        ]
        out += [_table(["metric", "value", "definition"], rows), ""]
        per_task = mt.get("per_task_forgetting") or []
        if per_task:
            out += ["Forgetting per task: " + ", ".join(f"{_md(data.task_names[j])} {_fmt(f)}" for j, f in enumerate(per_task)), ""]

        out += ["## Expert scores", ""]
        rows = []
        for j, name in enumerate(data.task_names, 1):
            learnt = data.rows[j][j - 1] if j < len(data.rows) else None
            final = data.rows[k][j - 1] if k >= 1 else None
            rows.append([_md(name), _fmt(data.expert_scores[j - 1]), _fmt(learnt), _fmt(final)])
        out += [_table(["task t", "expert E_t on t", "state after t on t", f"state after {k} on t"], rows), ""]

        if "scores" in plots:
            out += ["## Scores across steps", "", f"![scores across steps]({plots['scores']})", ""]

    out += ["## Timings (seconds)", ""]
    rows = []
    for step, name in enumerate(data.task_names, 1):
        record = data.task_record(step)
        loss = record.get("final_loss")
        rows.append([str(step), _md(name), str(record.get("status", "-")), _fmt(data.seconds(step, "train"), ".1f"),
                     _fmt(data.seconds(step, "integration"), ".2f"), _fmt(data.seconds(step, "geometry"), ".2f"),
                     _fmt(data.seconds(step, "eval"), ".1f"), _fmt(_number(loss), ".4f")])
    rows.append(["", "**total**", "", _fmt(data.total_seconds("train"), ".1f"), _fmt(data.total_seconds("integration"), ".2f"),
                 _fmt(data.total_seconds("geometry"), ".2f"), _fmt(data.total_seconds("eval"), ".1f"), ""])
    out += [_table(["step", "task", "status", "train", "integration", "geometry", "eval", "final loss"], rows), ""]
    if _number(m.get("base_eval_seconds")) is not None:
        out += [f"Base evaluation: {m['base_eval_seconds']:.1f} s.", ""]

    out += ["## Geometry: state-relative conflict (METHOD §1)", ""]
    if not data.geometry:
        out += [("No geometry diagnostics in this run directory (`geometry/<t>_<task>.json` missing: geometry disabled, "
                 "or a run made before it existed), so there are no conflict plots and no conflict-vs-forgetting test."), ""]
    else:
        out += ["Per step t and target tensor: GC(θ_{t−1} − θ0, Δ_t) ∈ [0, 1]; means over tensors. Undefined at t = 1 when θ_{t−1} = θ0.", ""]
        families = sorted({f for g in data.geometry.values() for f in g.by_family}, key=lambda f: _FAMILY_ORDER.get(f, 3))
        header = ["step", "task", "mean conflict", *[("MLP" if f == "mlp" else f) for f in families], "mean ‖Δ‖", "tensors (undefined)"]
        rows = []
        for step in sorted(data.geometry):
            g = data.geometry[step]
            count = "-" if g.count is None else f"{g.count + (g.undefined or 0)} ({g.undefined or 0})"
            rows.append([str(step), _md(g.task), _fmt(g.mean_conflict, ".4f"), *[_fmt(g.by_family.get(f), ".4f") for f in families],
                         _fmt(g.mean_norm, ".4g"), count])
        out += [_table(header, rows), ""]
        missing = [str(s) for s in range(1, k + 1) if s not in data.geometry]
        if missing:
            out += [f"No geometry file for step(s) {', '.join(missing)}.", ""]
        tops = [(s, g) for s, g in sorted(data.geometry.items()) if g.top]
        if tops:
            out += [f"Top {TOP_K} conflicting tensors per step:", ""]
            for step, g in tops:
                out.append(f"- step {step} ({_md(g.task)}): " + ", ".join(f"`{name}` {value:.4f}" for name, value in g.top))
            out.append("")
        if "tensors" in plots:
            out += [f"![per-tensor conflict]({plots['tensors']})", ""]

        out += ["## Conflict vs forgetting", ""]
        out += [
            "Claim under test (METHOD §1): higher state-relative conflict goes with larger forgetting (ρ > 0), and explains more than ‖Δ‖.",
            "",
            ("Pairs: one per step t ≥ 2 and earlier task j < t with R[t−1][j] and R[t][j] present; "
             "y = R[t−1][j] − R[t][j] (the drop in task j's score caused by step t, positive = forgetting); "
             "x = c_t, the step-t mean state-relative conflict over target tensors, or, for the baseline, "
             "x = the step-t mean ‖Δ_t‖_F. Spearman's ρ and its two-sided p-value (`scipy.stats.spearmanr`, ties averaged) "
             f"over the pairs whose x is defined; fewer than {MIN_PAIRS} pairs → not enough points."),
            "",
        ]
        if pairs:
            out += [_table(["t", "task j", "drop R[t−1][j] − R[t][j]", "c_t", "mean ‖Δ_t‖"],
                           [[str(p.step), _md(data.task_names[p.task - 1]), _fmt(p.drop, "+.4f"), _fmt(p.conflict, ".4f"), _fmt(p.norm, ".4g")] for p in pairs]), ""]
        out += [f"- Spearman(conflict, forgetting): {stats['conflict'].describe()}",
                f"- Spearman(‖Δ‖, forgetting): {stats['norm'].describe()}", ""]
        c, n = stats["conflict"], stats["norm"]
        if c.rho is not None and n.rho is not None:
            stronger = "conflict" if abs(c.rho) > abs(n.rho) else ("‖Δ‖" if abs(n.rho) > abs(c.rho) else "neither")
            out += [(f"Explanatory power (|ρ|): conflict {abs(c.rho):.4f} vs ‖Δ‖ {abs(n.rho):.4f}; {stronger} ranks the forgetting better on these "
                     f"{c.n} pairs (pairs of one step share its x, so the effective sample is the number of steps)."), ""]
        if "scatter" in plots:
            out += [f"![conflict vs forgetting]({plots['scatter']})", ""]

    if data.notes:
        out += ["## Notes", ""] + [f"- {_md(note)}" for note in data.notes] + [""]
    return "\n".join(out)


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``RUN_DIR/report.md`` and ``RUN_DIR/plots/*.png`` for what the run holds; returns the report's path."""
    data = load_run(run_dir)
    plot_dir = data.root / PLOTS
    pairs = forgetting_pairs(data.rows, data.geometry)
    stats = correlations(pairs)
    plots: dict[str, str] = {}

    def draw(key: str, filename: str, function, *args) -> None:
        try:
            function(data, *args, plot_dir / filename)
            plots[key] = f"{PLOTS}/{filename}"
        except Exception as exc:  # noqa: BLE001  (one bad plot must not lose the report)
            data.notes.append(f"could not draw {filename}: {type(exc).__name__}: {exc}")

    if data.rows:
        draw("matrix", MATRIX_PLOT, plot_accuracy_matrix)
        draw("scores", SCORES_PLOT, plot_task_scores)
    if any(g.per_tensor_conflict and any(v is not None for v in g.per_tensor_conflict.values()) for g in data.geometry.values()):
        draw("tensors", TENSOR_PLOT, plot_tensor_conflict)
    if any(p.conflict is not None or p.norm is not None for p in pairs):
        draw("scatter", SCATTER_PLOT, plot_conflict_vs_forgetting, pairs, stats)
    written = {Path(p).name for p in plots.values()}
    for stale in REPORT_PLOTS:  # plots of an earlier report this one no longer has
        if stale not in written:
            (plot_dir / stale).unlink(missing_ok=True)

    path = data.root / "report.md"
    atomic_write_text(path, render_report(data, plots, pairs, stats))
    return path


# ---------------------------------------------------------------------- comparison
def compare_runs(run_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike = ".") -> str:
    """One markdown table of several runs (``OUTPUT/compare.md``) and ``OUTPUT/compare.png``; returns the table."""
    if not run_dirs:
        raise CptError("compare: give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]  # two runs of the same name (different output_dir): add the parent folder
    labels = [f"{r.root.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]

    out = ["# Run comparison", ""]
    task_lists = {tuple(r.task_names) for r in runs}
    if len(task_lists) > 1:
        out += ["> **Warning: the runs are on different task lists**, so their metrics are not directly comparable: "
                + "; ".join(f"{_md(label)}: {', '.join(r.task_names) or '-'}" for label, r in zip(labels, runs)), ""]
    else:
        out += [f"Tasks: {', '.join(runs[0].task_names)}", ""]
    rows = []
    for label, r in zip(labels, runs):
        mt = r.metrics
        rows.append([_md(label), _md(r.strategy), f"{r.num_completed}/{len(r.task_names)}", _fmt(mt.get("acc")), _fmt(mt.get("bwt"), "+.3f"),
                     _fmt(mt.get("fwt"), "+.3f"), _fmt(mt.get("forgetting")), _fmt(r.total_seconds("train"), ".1f"),
                     _fmt(r.total_seconds("integration"), ".2f")])
    out += [_table(["run", "strategy", "tasks done", "ACC", "BWT", "FWT", "forgetting", "train s", "integration s"], rows), ""]
    out += ["Metrics: METHOD §5 over the tasks each run has completed; seconds summed over its tasks.", ""]

    output = Path(output_dir)
    try:
        _plot_compare(labels, runs, output / "compare.png")
        out += ["![ACC and forgetting per run](compare.png)", ""]
    except Exception as exc:  # noqa: BLE001  (the table matters more than the plot)
        out += [f"(could not draw compare.png: {type(exc).__name__}: {exc})", ""]
    text = "\n".join(out)
    atomic_write_text(output / "compare.md", text)
    return text


def _plot_compare(labels: list[str], runs: list[RunData], path: Path) -> None:
    n = len(runs)
    fig = _figure(max(5.0, 1.3 * n + 2.5), 4.0)
    ax = fig.add_subplot()
    width = 0.38
    for offset, key, name in ((-width / 2, "acc", "ACC"), (width / 2, "forgetting", "forgetting")):
        xs = [i + offset for i in range(n)]
        values = [r.metrics.get(key) for r in runs]
        bars = ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None], width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        for x, v in zip(xs, values):
            if v is None:
                ax.text(x, 0.0, "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(n), labels, rotation=20 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_ylabel("score")
    ax.set_title("ACC and average forgetting per run", fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    _save_png(fig, path)


__all__ = [
    "Correlation", "ForgettingPair", "RunData", "StepGeometry", "compare_runs", "correlations", "forgetting_pairs",
    "load_run", "render_report", "spearman", "tensor_family", "write_report",
]
