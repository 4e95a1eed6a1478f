"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend change).

* ``plots/accuracy_matrix.png`` (:func:`plot_accuracy_matrix`) — R[i][j] heatmap (rows base /
  after each task, one column per task, values annotated, entries not evaluated yet blank);
* ``plots/task_scores.png`` (:func:`plot_task_scores`) — each task's score across steps;
* ``plots/conflict_per_tensor.png`` (:func:`plot_tensor_conflict`) — per-tensor state-relative
  conflict (METHOD §1), tensors × steps, attention tensors then MLP tensors, each ordered by
  depth (:func:`tensor_order_key`); undefined values (e.g. step 1, where θ_{t−1} = θ0) blank;
* ``plots/conflict_vs_forgetting.png`` (:func:`plot_conflict_vs_forgetting`) — the
  forgetting caused by a step against that step's mean state-relative conflict, beside the
  same against its mean ``‖Δ‖``, each with Spearman's ρ and its p-value;
* ``plots/merge_effect.png`` (:func:`plot_merge_effect`) — what each step's merge did
  (METHOD §2.10): ``dev_sum`` (mean and per family) and the effective scale per step;
* ``compare.png`` (:func:`plot_run_comparison`) — ACC and forgetting per run, for ``cpt compare``.

Every PNG is written atomically (:func:`_save_png`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from cpt.naming import tensor_depth, tensor_family
from cpt.report.loading import RunData
from cpt.report.statistics import Correlation, ForgettingPair

PLOTS = "plots"
"""The run directory's folder of report figures."""
MATRIX_PLOT = "accuracy_matrix.png"
SCORES_PLOT = "task_scores.png"
TENSOR_PLOT = "conflict_per_tensor.png"
SCATTER_PLOT = "conflict_vs_forgetting.png"
MERGE_PLOT = "merge_effect.png"
REPORT_PLOTS = (MATRIX_PLOT, SCORES_PLOT, TENSOR_PLOT, SCATTER_PLOT, MERGE_PLOT)

# Tensors in the conflict heatmap: attention, then MLP, then the rest (cpt.naming's families).
FAMILY_ORDER = {"attention": 0, "mlp": 1, "other": 2}
_MODULE_ORDER = {
    name: i
    for i, name in enumerate(
        ["q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "gate_proj", "up_proj", "down_proj"]
    )
}


# ---------------------------------------------------------------------- tensor labels
def _module(name: str) -> str:
    """The module a tensor belongs to: ``q_proj`` for ``model.layers.0.self_attn.q_proj.weight``."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
        return parts[-2]
    return parts[-1]


def tensor_order_key(name: str) -> tuple:
    """Attention before MLP before other; then depth; then q, k, v, o / gate, up, down."""
    depth = tensor_depth(name)
    module = _module(name)
    return (
        FAMILY_ORDER[tensor_family(name)],
        depth is None,
        depth or 0,
        _MODULE_ORDER.get(module, len(_MODULE_ORDER)),
        name,
    )


def short_tensor_name(name: str) -> str:
    """``L<depth> <module>`` (``L0 q_proj``), or the name without ``.weight`` when it has no depth."""
    depth = tensor_depth(name)
    return f"L{depth} {_module(name)}" if depth is not None else name.removesuffix(".weight")


# ---------------------------------------------------------------------- canvas
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
    """``values`` as a masked array, ``None`` masked (drawn blank)."""
    import numpy as np

    array = np.array([[np.nan if value is None else value for value in row] for row in values], dtype=float)
    return np.ma.masked_invalid(array)


def _cmap(name: str):
    """Colormap ``name`` with masked entries white."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="white")


# ---------------------------------------------------------------------- the report's figures
def plot_accuracy_matrix(data: RunData, path: Path) -> None:
    num_tasks = len(data.task_names)
    values = [list(row) for row in data.rows] + [[None] * num_tasks for _ in range(num_tasks + 1 - len(data.rows))]
    labels = ["base"] + [f"after {name}" for name in data.task_names]
    present = [value for row in values for value in row if value is not None]
    unit = all(0.0 <= value <= 1.0 for value in present)
    fig = _figure(max(4.5, 1.1 * num_tasks + 2.5), max(3.0, 0.5 * (num_tasks + 1) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(
        _masked(values), cmap=_cmap("viridis"), vmin=0.0 if unit else None, vmax=1.0 if unit else None, aspect="auto"
    )
    lo, hi = (0.0, 1.0) if unit else (min(present, default=0.0), max(present, default=1.0))
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value is not None:
                light = (value - lo) / (hi - lo or 1.0) > 0.6
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9, color="black" if light else "white")
    ax.set_xticks(
        range(num_tasks),
        data.task_names,
        rotation=30 if num_tasks > 4 else 0,
        ha="right" if num_tasks > 4 else "center",
    )
    ax.set_yticks(range(num_tasks + 1), labels)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("state")
    done = f" (after {data.num_completed} of {num_tasks} tasks)" if data.num_completed < num_tasks else ""
    ax.set_title(f"{data.name}: accuracy matrix R[i][j]{done}", fontsize=10)
    fig.colorbar(image, ax=ax, label="score")
    _save_png(fig, path)


def plot_task_scores(data: RunData, path: Path) -> None:
    num_tasks = len(data.task_names)
    fig = _figure(max(5.0, 0.9 * num_tasks + 3.5), 3.8)
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
    ax.set_xticks(
        range(num_tasks + 1),
        ["base"] + [f"after {n}" for n in data.task_names],
        rotation=30 if num_tasks > 3 else 0,
        ha="right" if num_tasks > 3 else "center",
    )
    ax.set_xlim(-0.3, num_tasks + 0.3)
    ax.set_ylabel("score")
    ax.set_title(f"{data.name}: score of each task across steps (★ = just learnt)", fontsize=10)
    ax.grid(alpha=0.3)
    if data.task_names:
        ax.legend(fontsize=8, loc="best")
    _save_png(fig, path)


def plot_tensor_conflict(data: RunData, path: Path) -> None:
    steps = sorted(data.geometry)
    names = sorted({name for step in steps for name in data.geometry[step].per_tensor_conflict}, key=tensor_order_key)
    values = [[data.geometry[step].per_tensor_conflict.get(name) for step in steps] for name in names]
    num_tensors = len(names)
    dense = num_tensors > 40
    fig = _figure(max(4.5, 0.9 * len(steps) + 3.5), min(60.0, max(3.5, (0.13 if dense else 0.3) * num_tensors + 1.6)))
    ax = fig.add_subplot()
    image = ax.imshow(_masked(values), cmap=_cmap("magma"), aspect="auto", interpolation="nearest")
    ax.set_xticks(
        range(len(steps)),
        [f"{step}: {data.geometry[step].task}" for step in steps],
        rotation=30 if len(steps) > 4 else 0,
        ha="right" if len(steps) > 4 else "center",
        fontsize=8,
    )
    ax.set_yticks(range(num_tensors), [short_tensor_name(name) for name in names], fontsize=6 if dense else 8)
    if dense:  # a tall figure: step labels on top as well
        ax.tick_params(axis="x", labeltop=True, top=True)
    families = [tensor_family(name) for name in names]
    for i in range(1, num_tensors):
        if families[i] != families[i - 1]:
            ax.axhline(i - 0.5, color="cyan", linewidth=1.5)
    for family in dict.fromkeys(families):
        rows = [i for i, f in enumerate(families) if f == family]
        ax.text(
            1.02,
            (rows[0] + rows[-1]) / 2,
            "MLP" if family == "mlp" else family,
            transform=ax.get_yaxis_transform(),
            rotation=270,
            va="center",
            ha="left",
            fontsize=9,
        )
    ax.set_xlabel("step t: task")
    ax.set_title(
        f"{data.name}: per-tensor state-relative conflict\nGC(θ_(t−1) − θ0, Δ_t); blank = undefined", fontsize=10
    )
    fig.colorbar(image, ax=ax, label="geometry conflict", pad=0.1)
    _save_png(fig, path)


def plot_conflict_vs_forgetting(
    data: RunData, pairs: list[ForgettingPair], stats: dict[str, Correlation], path: Path
) -> None:
    fig = _figure(10.0, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    for ax, key, label in (
        (axes[0], "conflict", "mean state-relative conflict c_t"),
        (axes[1], "norm", "mean ‖Δ_t‖_F"),
    ):
        used = [pair for pair in pairs if getattr(pair, key) is not None]
        for pair in used:
            ax.scatter(getattr(pair, key), pair.drop, color=colours((pair.step - 2) % 10), s=40, zorder=3)
            if len(used) <= 20:
                ax.annotate(
                    f"t{pair.step}→{data.task_names[pair.task - 1]}",
                    (getattr(pair, key), pair.drop),
                    fontsize=7,
                    xytext=(4, 3),
                    textcoords="offset points",
                )
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.margins(x=0.15, y=0.12)
        ax.set_xlabel(label)
        ax.set_title(f"{'conflict' if key == 'conflict' else '‖Δ‖'}: {stats[key].describe()}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("forgetting of task j at step t\nR[t−1][j] − R[t][j]")
    fig.suptitle(f"{data.name}: forgetting vs state-relative conflict and vs update norm (Spearman)", fontsize=10)
    _save_png(fig, path)


# ---------------------------------------------------------------------- cpt compare
def plot_merge_effect(data: RunData, effects, path: Path) -> None:
    """Two panels over the steps: ``dev_sum`` in % (mean, attention, MLP) and the effective scale."""
    fig = _figure(8.0, 3.4)
    deviation, scale = fig.subplots(1, 2)
    steps = [effect.step for effect in effects]
    labels = [f"{effect.step}. {effect.task}" for effect in effects]
    series = {"mean": [effect.dev_sum for effect in effects]}
    for family in ("attention", "mlp"):
        values = [effect.dev_sum_by_family.get(family) for effect in effects]
        if any(value is not None for value in values):
            series["MLP" if family == "mlp" else family] = values
    for label, values in series.items():
        points = [(step, 100 * value) for step, value in zip(steps, values) if value is not None]
        if points:
            deviation.plot(*zip(*points), marker="o", label=label)
    deviation.set_ylabel("dev_sum = ‖m − s‖ / ‖s‖ (%)")
    deviation.set_title("distance from plain addition", fontsize=10)
    deviation.legend(fontsize=8, loc="best")
    points = [(effect.step, effect.effective_scale) for effect in effects if effect.effective_scale is not None]
    if points:
        scale.plot(*zip(*points), marker="o", color="tab:purple")
    scale.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    scale.set_ylabel("‖θ_t − θ0‖ / n̄_t")
    scale.set_title("effective scale (1 = one mean task vector)", fontsize=10)
    for ax in (deviation, scale):
        ax.set_xticks(steps, labels, rotation=30 if len(steps) > 3 else 0, ha="right" if len(steps) > 3 else "center")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{data.name}: what each merge did (METHOD §2.10)", fontsize=10)
    _save_png(fig, path)


def plot_run_comparison(labels: list[str], runs: list[RunData], path: Path) -> None:
    """Bars of ACC and forgetting per run (``n/a`` where a run has none)."""
    num_runs = len(runs)
    fig = _figure(max(5.0, 1.3 * num_runs + 2.5), 4.0)
    ax = fig.add_subplot()
    width = 0.38
    for offset, key, name in ((-width / 2, "acc", "ACC"), (width / 2, "forgetting", "forgetting")):
        xs = [i + offset for i in range(num_runs)]
        values = [run.metrics.get(key) for run in runs]
        bars = ax.bar(
            [x for x, value in zip(xs, values) if value is not None],
            [value for value in values if value is not None],
            width,
            label=name,
        )
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        for x, value in zip(xs, values):
            if value is None:
                ax.text(x, 0.0, "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(num_runs), labels, rotation=20 if num_runs > 3 else 0, ha="right" if num_runs > 3 else "center")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_ylabel("score")
    ax.set_title("ACC and average forgetting per run", fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    _save_png(fig, path)
