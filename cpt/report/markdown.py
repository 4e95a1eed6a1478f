"""``RUN_DIR/report.md``: :func:`render_report` writes its text, :func:`write_report` the file and its figures.

:func:`write_report` reads the run (:func:`cpt.report.loading.load_run`), computes the
conflict-vs-forgetting pairs and correlations (:mod:`cpt.report.statistics`), draws the
figures the run's data allow (:mod:`cpt.report.plots`; one failing figure becomes a note,
never a lost report), removes figures of an earlier report it no longer has, and writes
``report.md`` atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from cpt.evaluation.continual import format_matrix_table
from cpt.io import atomic_write_text
from cpt.report.loading import TOP_K, RunData, finite_number, load_run
from cpt.report.merge_effect import MergeEffect, merge_effects, merge_verdict
from cpt.report.plots import (
    FAMILY_ORDER,
    MATRIX_PLOT,
    MERGE_PLOT,
    PLOTS,
    REPORT_PLOTS,
    SCATTER_PLOT,
    SCORES_PLOT,
    TENSOR_PLOT,
    plot_accuracy_matrix,
    plot_conflict_vs_forgetting,
    plot_merge_effect,
    plot_task_scores,
    plot_tensor_conflict,
)
from cpt.report.statistics import MIN_PAIRS, Correlation, ForgettingPair, correlations, forgetting_pairs


def format_value(value: float | None, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec``; ``-`` when it is missing."""
    return "-" if value is None else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (cells already escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def escape_markdown(text: str) -> str:
    """``text`` safe inside a table cell (``|`` escaped)."""
    return str(text).replace("|", "\\|")


def general_ability_section(data: RunData) -> list[str]:
    """Lines of the "General ability (probes)" section; none for a run without probes."""
    kept = data.general_ability
    if kept is None:
        return []
    last = kept["last_row"]
    out = [
        "## General ability (probes)",
        "",
        "Probes are scored for the base and after every task but never trained; they are not in ACC/BWT/forgetting. "
        f"Kept = probe score after step {last} / the base's.",
        "",
    ]
    rows = [
        [
            escape_markdown(name),
            format_value(kept["base"][p]),
            format_value(kept["last"][p]),
            format_value(kept["per_probe"][name]),
        ]
        for p, name in enumerate(data.probe_names)
    ]
    rows.append(["**mean**", "", "", format_value(kept["mean"])])
    out += [markdown_table(["probe", "base", f"after step {last}", "kept"], rows), ""]
    return out


def render_report(
    data: RunData, plots: dict[str, str], pairs: list[ForgettingPair], stats: dict[str, Correlation]
) -> str:
    """The text of ``report.md`` (``plots``: plot key → relative path of the PNGs written)."""
    manifest = data.manifest
    num_tasks = len(data.task_names)
    completed = data.num_completed
    out = [f"# Run report: {escape_markdown(data.name)}", ""]
    out.append(f"- strategy: `{data.strategy}`")
    out.append(f"- recipe fingerprint: `{manifest.get('recipe_fingerprint', '?')}`")
    num_done = sum(1 for task in manifest["tasks"] if isinstance(task, dict) and task.get("status") == "done")
    out.append(f"- status: {manifest.get('status', '?')} — {num_done} of {num_tasks} tasks done")
    out.append(f"- tasks: {', '.join(f'{i}. {escape_markdown(n)}' for i, n in enumerate(data.task_names, 1))}")
    if manifest.get("created") or manifest.get("updated"):
        out.append(f"- created {manifest.get('created', '?')}, updated {manifest.get('updated', '?')}")
    versions = manifest.get("versions") or {}
    if versions:
        out.append(
            "- versions: " + ", ".join(f"{key} {value}" for key, value in versions.items() if value != "not installed")
        )
    out.append("")

    out += ["## Accuracy matrix", ""]
    if not data.rows:
        out += ["No evaluation results yet (`eval/matrix.json` is missing or empty).", ""]
    else:
        out += [
            "R[i][j] = score of the state after task i on task j's eval set (row `base` = θ0; row `expert` = E_t on its own task t).",
            "",
        ]
        probe_columns = {"probe_rows": data.probe_rows, "probe_names": data.probe_names} if data.probe_names else {}
        table = format_matrix_table(data.rows, data.task_names, data.expert_scores, data.metrics, **probe_columns)
        out += ["```text", table, "```", ""]
        if manifest.get("evaluation_rows") == "needed":
            out += [
                "`-` in the matrix: not evaluated (`evaluation.rows: needed` scores only the entries METHOD §5's "
                "ACC, BWT, FWT and forgetting read).",
                "",
            ]
        if "matrix" in plots:
            out += [f"![accuracy matrix]({plots['matrix']})", ""]

        metrics = data.metrics
        out += ["## Continual metrics (METHOD §5)", ""]
        if completed < num_tasks:
            out += [
                f"Run in progress: metrics over the {completed} task(s) learnt so far (FWT uses every row present).",
                "",
            ]
        rows = [
            ["ACC", format_value(metrics.get("acc")), "mean_j R[k][j], j ≤ k"],
            ["BWT", format_value(metrics.get("bwt"), "+.3f"), "mean_{j<k} (R[k][j] − R[j][j])"],
            ["FWT", format_value(metrics.get("fwt"), "+.3f"), "mean_{j>1} (R[j−1][j] − R[0][j])"],
            ["forgetting", format_value(metrics.get("forgetting")), "mean_{j<k} (max_{i<k} R[i][j] − R[k][j])"],
            ["ACC over all tasks", format_value(metrics.get("acc_all_tasks")), "mean of row k over all T tasks"],
            ["expert ACC", format_value(metrics.get("expert_acc")), "mean_j E_j on task j, j ≤ k"],
            ["ACC / expert", format_value(metrics.get("normalized_acc")), "mean_j R[k][j] / E_j"],
        ]
        out += [markdown_table(["metric", "value", "definition"], rows), ""]
        per_task = metrics.get("per_task_forgetting") or []
        if per_task:
            out += [
                "Forgetting per task: "
                + ", ".join(f"{escape_markdown(data.task_names[j])} {format_value(f)}" for j, f in enumerate(per_task)),
                "",
            ]

        out += general_ability_section(data)
        out += ["## Expert scores", ""]
        rows = []
        for j, name in enumerate(data.task_names, 1):
            learnt = data.rows[j][j - 1] if j < len(data.rows) else None
            final = data.rows[completed][j - 1] if completed >= 1 else None
            rows.append(
                [
                    escape_markdown(name),
                    format_value(data.expert_scores[j - 1]),
                    format_value(learnt),
                    format_value(final),
                ]
            )
        out += [
            markdown_table(["task t", "expert E_t on t", "state after t on t", f"state after {completed} on t"], rows),
            "",
        ]

        if "scores" in plots:
            out += ["## Scores across steps", "", f"![scores across steps]({plots['scores']})", ""]

        # What the model got wrong after the last step (per-example outcomes, eval/<row>_<task>.jsonl).
        from cpt.evaluation.outcomes import format_wrong_answers, wrong_answers

        outcome_names = data.task_names + [f"probe-{name}" for name in data.probe_names]
        picked = wrong_answers(data.root / "eval", completed, outcome_names, limit=3)
        if picked:
            out += [f"## Wrong answers after step {completed} (first 3 per task)", "", format_wrong_answers(picked), ""]

    out += ["## Timings (seconds)", ""]
    rows = []
    for step, name in enumerate(data.task_names, 1):
        record = data.task_record(step)
        loss = record.get("final_loss")
        rows.append(
            [
                str(step),
                escape_markdown(name),
                str(record.get("status", "-")),
                format_value(data.seconds(step, "train"), ".1f"),
                format_value(data.seconds(step, "integration"), ".2f"),
                format_value(data.seconds(step, "geometry"), ".2f"),
                format_value(data.seconds(step, "eval"), ".1f"),
                format_value(finite_number(loss), ".4f"),
            ]
        )
    rows.append(
        [
            "",
            "**total**",
            "",
            format_value(data.total_seconds("train"), ".1f"),
            format_value(data.total_seconds("integration"), ".2f"),
            format_value(data.total_seconds("geometry"), ".2f"),
            format_value(data.total_seconds("eval"), ".1f"),
            "",
        ]
    )
    out += [
        markdown_table(["step", "task", "status", "train", "integration", "geometry", "eval", "final loss"], rows),
        "",
    ]
    if finite_number(manifest.get("base_eval_seconds")) is not None:
        out += [f"Base evaluation: {manifest['base_eval_seconds']:.1f} s.", ""]

    out += render_merge_effect(merge_effects(data), plots)

    out += ["## Geometry: state-relative conflict (METHOD §1)", ""]
    if not data.geometry:
        out += [
            (
                "No geometry diagnostics in this run directory (`geometry/<t>_<task>.json` missing: geometry disabled, "
                "or a run made before it existed), so there are no conflict plots and no conflict-vs-forgetting test."
            ),
            "",
        ]
    else:
        out += [
            "Per step t and target tensor: GC(θ_{t−1} − θ0, Δ_t) ∈ [0, 1]; means over tensors. Undefined at t = 1 when θ_{t−1} = θ0.",
            "",
        ]
        families = sorted(
            {family for step_geometry in data.geometry.values() for family in step_geometry.by_family},
            key=lambda family: FAMILY_ORDER.get(family, 3),
        )
        header = [
            "step",
            "task",
            "mean conflict",
            *[("MLP" if family == "mlp" else family) for family in families],
            "mean ‖Δ‖",
            "tensors (undefined)",
        ]
        rows = []
        for step in sorted(data.geometry):
            step_geometry = data.geometry[step]
            undefined = step_geometry.undefined or 0
            count = "-" if step_geometry.count is None else f"{step_geometry.count + undefined} ({undefined})"
            rows.append(
                [
                    str(step),
                    escape_markdown(step_geometry.task),
                    format_value(step_geometry.mean_conflict, ".4f"),
                    *[format_value(step_geometry.by_family.get(family), ".4f") for family in families],
                    format_value(step_geometry.mean_norm, ".4g"),
                    count,
                ]
            )
        out += [markdown_table(header, rows), ""]
        missing = [str(step) for step in range(1, completed + 1) if step not in data.geometry]
        if missing:
            out += [f"No geometry file for step(s) {', '.join(missing)}.", ""]
        tops = [(step, step_geometry) for step, step_geometry in sorted(data.geometry.items()) if step_geometry.top]
        if tops:
            out += [f"Top {TOP_K} conflicting tensors per step:", ""]
            for step, step_geometry in tops:
                out.append(
                    f"- step {step} ({escape_markdown(step_geometry.task)}): "
                    + ", ".join(f"`{name}` {value:.4f}" for name, value in step_geometry.top)
                )
            out.append("")
        if "tensors" in plots:
            out += [f"![per-tensor conflict]({plots['tensors']})", ""]

        out += ["## Conflict vs forgetting", ""]
        out += [
            "Claim under test (METHOD §1): higher state-relative conflict goes with larger forgetting (ρ > 0), and explains more than ‖Δ‖.",
            "",
            (
                "Pairs: one per step t ≥ 2 and earlier task j < t with R[t−1][j] and R[t][j] present; "
                "y = R[t−1][j] − R[t][j] (the drop in task j's score caused by step t, positive = forgetting); "
                "x = c_t, the step-t mean state-relative conflict over target tensors, or, for the baseline, "
                "x = the step-t mean ‖Δ_t‖_F. Spearman's ρ and its two-sided p-value (`scipy.stats.spearmanr`, ties averaged) "
                f"over the pairs whose x is defined; fewer than {MIN_PAIRS} pairs → not enough points."
            ),
            "",
        ]
        if pairs:
            out += [
                markdown_table(
                    ["t", "task j", "drop R[t−1][j] − R[t][j]", "c_t", "mean ‖Δ_t‖"],
                    [
                        [
                            str(pair.step),
                            escape_markdown(data.task_names[pair.task - 1]),
                            format_value(pair.drop, "+.4f"),
                            format_value(pair.conflict, ".4f"),
                            format_value(pair.norm, ".4g"),
                        ]
                        for pair in pairs
                    ],
                ),
                "",
            ]
        out += [
            f"- Spearman(conflict, forgetting): {stats['conflict'].describe()}",
            f"- Spearman(‖Δ‖, forgetting): {stats['norm'].describe()}",
            "",
        ]
        by_conflict, by_norm = stats["conflict"], stats["norm"]
        if by_conflict.rho is not None and by_norm.rho is not None:
            conflict_rho, norm_rho = abs(by_conflict.rho), abs(by_norm.rho)
            stronger = "conflict" if conflict_rho > norm_rho else ("‖Δ‖" if norm_rho > conflict_rho else "neither")
            out += [
                (
                    f"Explanatory power (|ρ|): conflict {conflict_rho:.4f} vs ‖Δ‖ {norm_rho:.4f}; {stronger} ranks the forgetting better on these "
                    f"{by_conflict.n} pairs (pairs of one step share its x, so the effective sample is the number of steps)."
                ),
                "",
            ]
        if "scatter" in plots:
            out += [f"![conflict vs forgetting]({plots['scatter']})", ""]

    if data.notes:
        out += ["## Notes", ""] + [f"- {escape_markdown(note)}" for note in data.notes] + [""]
    return "\n".join(out)


def render_merge_effect(effects: list[MergeEffect], plots: dict[str, str]) -> list[str]:
    """The "What each merge did" section (METHOD §2.10): a table and a verdict per step; nothing
    for runs whose integration files do not record it (training-time strategies, older runs)."""
    if not effects:
        return []
    out = ["## What each merge did (METHOD §2.10)", ""]
    out += [
        (
            "dev_sum = ‖m − s‖ / ‖s‖ per target tensor (mean, and per family): how far the merged delta m is from "
            "the plain sum s of the step's active deltas (0 = the merge is plain addition); effective scale = "
            "‖θ_t − θ0‖ / n̄_t, the state's delta in units of a mean task vector. Together they say whether the "
            "merge rule changed the result, or only the step coefficient did."
        ),
        "",
    ]
    families = [family for family in ("attention", "mlp") if any(family in e.dev_sum_by_family for e in effects)]
    header = ["step", "task", "dev_sum", *[("MLP" if f == "mlp" else f) for f in families], "effective scale"]
    rows = [
        [
            str(effect.step),
            escape_markdown(effect.task),
            format_value(effect.dev_sum, ".4f"),
            *[format_value(effect.dev_sum_by_family.get(family), ".4f") for family in families],
            format_value(effect.effective_scale, ".3f"),
        ]
        for effect in effects
    ]
    out += [markdown_table(header, rows), ""]
    out += [f"- step {e.step} ({escape_markdown(e.task)}): {merge_verdict(e)}" for e in effects] + [""]
    if "merge" in plots:
        out += [f"![what each merge did]({plots['merge']})", ""]
    return out


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
    if any(
        step_geometry.per_tensor_conflict
        and any(value is not None for value in step_geometry.per_tensor_conflict.values())
        for step_geometry in data.geometry.values()
    ):
        draw("tensors", TENSOR_PLOT, plot_tensor_conflict)
    if any(pair.conflict is not None or pair.norm is not None for pair in pairs):
        draw("scatter", SCATTER_PLOT, plot_conflict_vs_forgetting, pairs, stats)
    effects = merge_effects(data)
    if effects:
        draw("merge", MERGE_PLOT, plot_merge_effect, effects)
    written = {Path(relative).name for relative in plots.values()}
    for stale in REPORT_PLOTS:  # plots of an earlier report this one no longer has
        if stale not in written:
            (plot_dir / stale).unlink(missing_ok=True)

    path = data.root / "report.md"
    atomic_write_text(path, render_report(data, plots, pairs, stats))
    return path
