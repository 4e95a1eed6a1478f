"""``cpt compare``: several runs in one table (``compare.md``) and one bar chart (``compare.png``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cpt.errors import CptError
from cpt.io import atomic_write_text
from cpt.report.loading import load_run
from cpt.report.markdown import escape_markdown, format_value, markdown_table
from cpt.report.plots import plot_run_comparison


def compare_runs(run_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike = ".") -> str:
    """One markdown table of several runs (``OUTPUT/compare.md``) and ``OUTPUT/compare.png``; returns the table."""
    if not run_dirs:
        raise CptError("compare: give at least one run directory")
    runs = [load_run(run_dir) for run_dir in run_dirs]
    names = [run.name for run in runs]  # two runs of the same name (different output_dir): add the parent folder
    labels = [f"{run.root.parent.name}/{run.name}" if names.count(run.name) > 1 else run.name for run in runs]

    out = ["# Run comparison", ""]
    task_lists = {tuple(run.task_names) for run in runs}
    if len(task_lists) > 1:
        out += [
            "> **Warning: the runs are on different task lists**, so their metrics are not directly comparable: "
            + "; ".join(
                f"{escape_markdown(label)}: {', '.join(run.task_names) or '-'}" for label, run in zip(labels, runs)
            ),
            "",
        ]
    else:
        out += [f"Tasks: {', '.join(runs[0].task_names)}", ""]
    rows = []
    for label, run in zip(labels, runs):
        metrics = run.metrics
        rows.append(
            [
                escape_markdown(label),
                escape_markdown(run.strategy),
                f"{run.num_completed}/{len(run.task_names)}",
                format_value(metrics.get("acc")),
                format_value(metrics.get("bwt"), "+.3f"),
                format_value(metrics.get("fwt"), "+.3f"),
                format_value(metrics.get("forgetting")),
                format_value(run.total_seconds("train"), ".1f"),
                format_value(run.total_seconds("integration"), ".2f"),
            ]
        )
    out += [
        markdown_table(
            ["run", "strategy", "tasks done", "ACC", "BWT", "FWT", "forgetting", "train s", "integration s"], rows
        ),
        "",
    ]
    out += ["Metrics: METHOD §5 over the tasks each run has completed; seconds summed over its tasks.", ""]

    output = Path(output_dir)
    try:
        plot_run_comparison(labels, runs, output / "compare.png")
        out += ["![ACC and forgetting per run](compare.png)", ""]
    except Exception as exc:  # noqa: BLE001  (the table matters more than the plot)
        out += [f"(could not draw compare.png: {type(exc).__name__}: {exc})", ""]
    text = "\n".join(out)
    atomic_write_text(output / "compare.md", text)
    return text
