"""``cpt compare``: several runs in one table (``compare.md``) and one bar chart (``compare.png``)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from cpt.errors import CptError
from cpt.io import atomic_write_text
from cpt.report.loading import load_run
from cpt.report.markdown import escape_markdown, format_value, markdown_table
from cpt.report.plots import plot_run_comparison

_SEED_SUFFIX = re.compile(r"-seed(\d+)$")


def seed_intervals(runs: Sequence) -> list[str]:
    """Markdown lines with 95 % intervals when the runs carry several seeds of the same variant (METHOD §6).

    A run's variant is its name without a ``-seed<N>`` suffix (how ``cpt study`` names runs), and
    its seed is its recipe's ``seed``. Only finished runs on the seeds every variant has count;
    with fewer than two such seeds per variant, no interval is drawn (one seed has none).
    """
    from cpt.study.statistics import bootstrap_study
    from cpt.study.summary import format_statistics_tables, read_run_outcomes

    groups: dict[str, dict[int, object]] = {}
    strategies: dict[str, str] = {}
    for run in runs:
        if run.num_completed < len(run.task_names) or not run.task_names:
            continue
        recipe = yaml.safe_load((run.root / "recipe.yaml").read_text()) if (run.root / "recipe.yaml").is_file() else {}
        seed = (recipe or {}).get("seed")
        if not isinstance(seed, int):
            continue
        variant = _SEED_SUFFIX.sub("", run.name)
        groups.setdefault(variant, {})[seed] = run
        strategies[variant] = run.strategy
    if len(groups) == 0 or max(len(seeds) for seeds in groups.values()) < 2:
        return []
    common = sorted(set.intersection(*(set(seeds) for seeds in groups.values())))
    if len(common) < 2:
        return ["Seeds: the variants share fewer than two seeds, so no intervals are drawn.", ""]
    if len({tuple(groups[v][s].task_names) for v in groups for s in common}) > 1:
        return ["Seeds: the runs are on different task lists, so no intervals are drawn.", ""]
    outcomes = [read_run_outcomes(groups[v][s].root, v, s) for v in groups for s in common]
    stats = bootstrap_study(outcomes).as_dict()
    level = "seeds and eval examples" if stats["example_level"] else "seeds only (no per-example outcomes)"
    variants = [{"name": v, "strategy": strategies[v], "params": {}} for v in groups]
    return [
        "## Intervals over seeds",
        "",
        f"Seeds {common}; paired cluster bootstrap over {level}, {stats['resamples']} resamples (METHOD §6).",
        "",
        *format_statistics_tables(stats, variants),
        "",
    ]


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
    out += seed_intervals(runs)

    output = Path(output_dir)
    try:
        plot_run_comparison(labels, runs, output / "compare.png")
        out += ["![ACC and forgetting per run](compare.png)", ""]
    except Exception as exc:  # noqa: BLE001  (the table matters more than the plot)
        out += [f"(could not draw compare.png: {type(exc).__name__}: {exc})", ""]
    text = "\n".join(out)
    atomic_write_text(output / "compare.md", text)
    return text
