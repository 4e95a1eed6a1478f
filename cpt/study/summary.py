"""A study's summary, rebuilt from its run directories: per-example outcomes, statistics, tables, a plot.

``build_summary`` reads every finished run of the study (``runs/<variant>-seed<s>/``): its
per-example outcomes (``eval/<row>_<task>.jsonl``) for the paired cluster bootstrap of
:mod:`cpt.study.statistics` (METHOD §6), its manifest for the seconds and experts it accounts
for, its geometry for conflict vs forgetting, its probes for the general ability kept. It never
runs anything, so ``cpt study --summary-only`` and every process of a study (``--workers``) can
write it at any time; ``write_summary`` writes ``summary.json``, ``summary.md`` and
``summary.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from cpt.errors import CptError
from cpt.io import atomic_write_json, atomic_write_text, read_json
from cpt.study.spec import Study
from cpt.study.statistics import METRICS, RunOutcomes, bootstrap_study, pooled_spearman


def run_finished(run_dir: Path, fingerprint: str | None = None) -> bool:
    """Whether ``run_dir`` holds a complete run (of the recipe with ``fingerprint``, when given)."""
    manifest = read_json(run_dir / "manifest.json")
    return bool(
        manifest
        and manifest.get("status") == "complete"
        and (fingerprint is None or manifest.get("recipe_fingerprint") == fingerprint)
    )


# ---------------------------------------------------------------------- reading runs
def read_run_outcomes(run_dir: Path, variant: str, seed: int) -> RunOutcomes:
    """Per-example outcomes of a finished run from ``eval/<row>_<task>.jsonl`` (rows 1..T),
    or — when any of those files is missing — its score matrix (seed-level statistics only).

    An entry that is null in the matrix was not evaluated (``evaluation.rows: needed``): it has
    no file and is left out of ``correct`` and ``scores``, not a reason to fall back."""
    matrix = read_json(run_dir / "eval" / "matrix.json")
    tasks = list(matrix["tasks"])
    T = len(tasks)
    scores = {
        i: {task: matrix["rows"][i][j] for j, task in enumerate(tasks) if matrix["rows"][i][j] is not None}
        for i in range(1, T + 1)
        if matrix["rows"][i] is not None
    }
    correct: dict[int, dict[str, np.ndarray]] = {}
    ids: dict[str, list[str]] = {}
    for i in range(1, T + 1):
        for task in tasks:
            if task not in scores.get(i, {}):
                continue  # not evaluated: no per-example file to read
            path = run_dir / "eval" / f"{i}_{task}.jsonl"
            if not path.exists():
                return RunOutcomes(variant, seed, tasks, scores=scores)
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            try:
                records.sort(key=lambda record: str(record["id"]))  # align examples across rows and variants by id
                outcomes = np.array([float(bool(record["correct"])) for record in records])
            except KeyError as exc:
                raise CptError(f"{path}: every line needs 'id' and 'correct' (missing {exc})") from None
            correct.setdefault(i, {})[task] = outcomes
            ids.setdefault(task, [str(record["id"]) for record in records])
    return RunOutcomes(variant, seed, tasks, correct, ids, scores)


def manifest_seconds(manifest: dict) -> dict[str, float]:
    """The seconds a run's manifest accounts for: training, evaluation (base row included), integration, geometry."""
    tasks = manifest.get("tasks", [])
    return {
        "train_seconds": sum(t.get("train_seconds", 0.0) for t in tasks),
        "eval_seconds": manifest.get("base_eval_seconds", 0.0) + sum(t.get("eval_seconds", 0.0) for t in tasks),
        "integration_seconds": sum(t.get("integration_seconds", 0.0) for t in tasks),
        "geometry_seconds": sum(t.get("geometry_seconds") or 0.0 for t in tasks),
    }


def _run_costs(run_dir: Path) -> dict[str, float]:
    manifest = read_json(run_dir / "manifest.json") or {}
    tasks = manifest.get("tasks", [])
    hits = sum(1 for t in tasks if (t.get("expert_cache") or {}).get("hit"))
    seconds = manifest_seconds(manifest)
    return {
        "train_seconds": seconds["train_seconds"],
        "eval_seconds": seconds["eval_seconds"],
        "integration_seconds": seconds["integration_seconds"],
        "experts_trained": len(tasks) - hits,
        "experts_reused": hits,
        "base_row_copied": bool(manifest.get("base_row_from")),
    }


# ---------------------------------------------------------------------- the summary
def build_summary(study: Study) -> dict[str, Any]:
    seeds = study.spec.seeds
    finished = {(v.name, s): run_finished(study.runs_dir / study.run_name(v, s)) for v in study.variants for s in seeds}
    complete_seeds = [s for s in seeds if all(finished[(v.name, s)] for v in study.variants)]
    pending = [study.run_name(v, s) for v in study.variants for s in seeds if not finished[(v.name, s)]]
    summary: dict[str, Any] = {
        "study": study.name,
        "recipe": study.spec.recipe,
        "seeds": seeds,
        "seeds_used": complete_seeds,
        "pending_runs": pending,
        "variants": [
            {"name": v.name, "strategy": v.strategy, "params": v.params}
            | ({"order": v.order_text} if v.order != "given" else {})
            for v in study.variants
        ],
    }
    orders = _task_orders(study)
    if orders:
        summary["task_orders"] = orders
        same = {str(seed): groups for seed in seeds if (groups := study.same_order_groups(seed))}
        if same:  # e.g. a random order that happens to be a seed's planned one
            summary["same_orders"] = same
    if study.plans:
        summary["plans"] = {
            str(seed): {key: value for key, value in study.plans[seed].items() if key != "conflicts"}
            for seed in seeds
            if seed in study.plans
        }
        predicted = predicted_conflicts(study)
        if predicted:
            summary["predicted_conflict"] = predicted
            relation = predicted_conflict_vs_forgetting(study, finished, predicted)
            if relation:
                summary["predicted_conflict_vs_forgetting"] = relation
    costs = {
        study.run_name(v, s): _run_costs(study.runs_dir / study.run_name(v, s))
        for v in study.variants
        for s in seeds
        if finished[(v.name, s)]
    }
    summary["costs"] = {
        "runs": costs,
        **{
            key: sum(c[key] for c in costs.values())
            for key in ("train_seconds", "eval_seconds", "integration_seconds", "experts_trained", "experts_reused")
        },
    }
    kept = _general_ability_by_variant(study, finished)
    if kept:
        summary["general_ability_kept"] = kept
    correlation = conflict_vs_forgetting(study, finished)
    if correlation:
        summary["conflict_vs_forgetting"] = correlation
    if not complete_seeds:
        summary["statistics"] = None
        summary["note"] = "no seed has finished runs of every variant yet"
        return summary
    runs = [
        read_run_outcomes(study.runs_dir / study.run_name(v, s), v.name, s)
        for v in study.variants
        for s in complete_seeds
    ]
    settings = study.spec.statistics
    stats = bootstrap_study(runs, resamples=settings.resamples, confidence=settings.confidence, seed=settings.seed)
    summary["statistics"] = stats.as_dict()
    summary["note"] = (
        "95 % intervals: paired cluster bootstrap over seeds and eval examples (METHOD §6)"
        if stats.example_level
        else "no per-example outcomes (eval/<row>_<task>.jsonl) in these runs: intervals resample seeds only, "
        "so they leave out the eval-set sampling error"
    )
    return summary


def conflict_vs_forgetting(study: Study, finished: dict) -> dict[str, Any] | None:
    """The report's conflict-vs-forgetting correlations (METHOD §1), pooled over the study's seeds.

    Per variant whose runs recorded geometry (``geometry/<t>_<task>.json``), and pooled over all
    such variants when there are several: the (step, earlier task) pairs of every finished run
    exactly as ``cpt report`` forms them (:func:`cpt.report.statistics.forgetting_pairs`), and for
    each signal — the state-relative conflict, ``‖Δ‖`` and SAR — Spearman's ρ of the pooled pairs
    with a cluster-bootstrap interval over seeds and pairs (:func:`pooled_spearman`). ``None``
    when no finished run has geometry.
    """
    from cpt.report.loading import load_run
    from cpt.report.statistics import MIN_PAIRS, SIGNALS, forgetting_pairs, signal_points

    settings = study.spec.statistics
    pairs_by_variant: dict[str, dict[int, list]] = {}
    for variant in study.variants:
        by_seed = {}
        for seed in study.spec.seeds:
            if finished[(variant.name, seed)]:
                data = load_run(study.runs_dir / study.run_name(variant, seed))
                by_seed[seed] = forgetting_pairs(data.rows, data.geometry)
        if any(pair.conflict is not None for pairs in by_seed.values() for pair in pairs):
            pairs_by_variant[variant.name] = by_seed
    if not pairs_by_variant:
        return None

    def correlate(runs_by_seed: dict[int, list[list]]) -> dict[str, dict]:
        out = {}
        for signal in SIGNALS:
            clusters = {seed: [signal_points(pairs, signal) for pairs in runs] for seed, runs in runs_by_seed.items()}
            if not any(len(x) for runs in clusters.values() for x, _ in runs):
                continue  # not recorded (e.g. SAR in geometry files from before it was aggregated)
            result = pooled_spearman(
                clusters,
                signal=signal,
                resamples=settings.resamples,
                confidence=settings.confidence,
                seed=settings.seed,
            )
            out[signal] = result.as_dict()
        return out

    groups = {
        name: correlate({s: [pairs] for s, pairs in by_seed.items()}) for name, by_seed in pairs_by_variant.items()
    }
    result: dict[str, Any] = {
        "resamples": settings.resamples,
        "confidence": settings.confidence,
        "min_pairs": MIN_PAIRS,
        "variants": groups,
    }
    if len(pairs_by_variant) > 1:
        pooled: dict[int, list[list]] = {}
        for by_seed in pairs_by_variant.values():
            for seed, pairs in by_seed.items():
                pooled.setdefault(seed, []).append(pairs)
        result["pooled"] = correlate(pooled)
        result["pooled_variants"] = list(pairs_by_variant)
    return result


SIGNAL_LABELS = {"conflict": "conflict", "norm": "‖Δ‖", "sar": "SAR"}


def _format_correlation(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if entry["rho"] is None:
        return entry["reason"]
    if entry["low"] is None:
        return f"{entry['rho']:+.3f} [-]"
    return f"{entry['rho']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def _format_correlations(summary: dict[str, Any]) -> list[str]:
    """Markdown: the pooled conflict-vs-forgetting table (:func:`conflict_vs_forgetting`)."""
    found = summary.get("conflict_vs_forgetting")
    if not found:
        return []
    confidence = round(100 * found["confidence"])
    out = [
        "",
        (
            "Conflict vs forgetting, pooled over seeds (METHOD §1): Spearman ρ of each step's signal against the "
            "drop of every earlier task's score (the pairs of `cpt report`), with its "
            f"{confidence} % interval (bootstrap over seeds, then pairs within each seed's runs; METHOD §6). "
            "ρ > 0: more signal, more forgetting."
        ),
        "",
        "| variant | seeds | pairs | "
        + " | ".join(f"ρ {SIGNAL_LABELS[s]} [{confidence} % CI]" for s in SIGNAL_LABELS)
        + " |",
        "|---|---|---|" + "---|" * len(SIGNAL_LABELS),
    ]
    groups = dict(found["variants"])
    if "pooled" in found:
        groups[f"all {len(found['pooled_variants'])} variants"] = found["pooled"]
    for name, by_signal in groups.items():
        first = by_signal.get("conflict") or next(iter(by_signal.values()), None) or {"n": 0, "seeds": []}
        cells = [_format_correlation(by_signal.get(signal)) for signal in SIGNAL_LABELS]
        out.append(f"| {name} | {len(first['seeds'])} | {first['n']} | " + " | ".join(cells) + " |")
    return out


def predicted_conflicts(study: Study) -> dict[str, dict[str, float]]:
    """``{variant: {seed: C}}``: METHOD §7's predicted conflict of the order each variant trains on each seed, from
    the step conflicts the seed's plan measured (``plan-seed<s>.json``; plans written before they kept them
    give none)."""
    from cpt.planning.order import order_cost

    out: dict[str, dict[str, float]] = {}
    for seed, plan in study.plans.items():
        if not plan.get("conflicts"):
            continue
        table = {(frozenset(entry["previous"]), entry["task"]): entry["conflict"] for entry in plan["conflicts"]}
        for variant in study.variants:
            order = study.task_order(variant, seed)
            cost, _ = order_cost(order, lambda previous, task, table=table: table[(frozenset(previous), task)])
            out.setdefault(variant.name, {})[str(seed)] = cost
    return out


def predicted_conflict_vs_forgetting(study: Study, finished: dict, predicted: dict) -> dict[str, Any]:
    """Per strategy trained in several orders: Spearman's ρ of the predicted conflict C of each run's order against
    the run's forgetting (METHOD §5), pooled over seeds with the cluster bootstrap (:func:`pooled_spearman`) —
    METHOD §7's premise that less predicted conflict means less forgetting, measured."""
    settings = study.spec.statistics
    by_strategy: dict[str, dict[int, list]] = {}
    for variant in study.variants:
        for seed in study.spec.seeds:
            cost = predicted.get(variant.name, {}).get(str(seed))
            if cost is None or not finished[(variant.name, seed)]:
                continue
            matrix = read_json(study.runs_dir / study.run_name(variant, seed) / "eval" / "matrix.json")
            forgetting = (matrix.get("metrics") or {}).get("forgetting")
            if forgetting is not None:
                by_strategy.setdefault(variant.strategy, {}).setdefault(seed, []).append(([cost], [forgetting]))
    out = {}
    for strategy, clusters in by_strategy.items():
        if sum(len(runs) for runs in clusters.values()) < 3:
            continue
        result = pooled_spearman(
            clusters,
            signal="predicted_conflict",
            resamples=settings.resamples,
            confidence=settings.confidence,
            seed=settings.seed,
        )
        out[strategy] = result.as_dict()
    return out


def _task_orders(study: Study) -> dict[str, dict[str, list[str] | None]]:
    """``{variant: {seed: task names in training order}}`` for the variants not in the given order
    (``None`` where the seed's plan is not known yet)."""
    out = {}
    for variant in study.variants:
        if variant.order == "given":
            continue
        out[variant.name] = {
            str(seed): study.task_order(variant, seed) if not variant.needs_plan or seed in study.plans else None
            for seed in study.spec.seeds
        }
    return out


def _format_orders(summary: dict[str, Any]) -> list[str]:
    """Markdown: the planned order of every seed (METHOD §7) and each reordered variant's task order."""
    out: list[str] = []
    plans = summary.get("plans") or {}
    if plans:
        out += [
            "",
            "Planned orders (METHOD §7: least predicted conflict C over the θ0 experts' task vectors):",
            "",
            "| seed | planned order | C planned | C given | experts from the cache |",
            "|---|---|---|---|---|",
        ]
        for seed, plan in plans.items():
            hits = plan.get("experts_from_cache") or []
            out.append(
                f"| {seed} | {' → '.join(plan['planned'])} | {plan['cost']:.4f} | {plan['given_cost']:.4f} | "
                f"{sum(hits)}/{len(hits)} |"
            )
    orders = summary.get("task_orders") or {}
    if orders:
        seeds = [str(seed) for seed in summary["seeds"]]
        out += ["", "| variant | " + " | ".join(f"order, seed {seed}" for seed in seeds) + " |"]
        out.append("|---|" + "---|" * len(seeds))
        predicted = summary.get("predicted_conflict") or {}
        for name, by_seed in orders.items():
            cells = [
                (" → ".join(by_seed[seed]) if by_seed.get(seed) else "(not planned yet)")
                + (f" (C = {predicted[name][seed]:.4f})" if seed in predicted.get(name, {}) else "")
                for seed in seeds
            ]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    relation = summary.get("predicted_conflict_vs_forgetting") or {}
    if relation:
        out += [
            "",
            "Predicted conflict C of each run's order against the run's forgetting (METHOD §7's premise: less "
            "predicted conflict, less forgetting), Spearman ρ pooled over seeds with its cluster-bootstrap interval:",
            "",
        ]
        for strategy, entry in relation.items():
            per_seed = ", ".join(
                f"seed {seed} {rho:+.2f}" if rho is not None else f"seed {seed} -"
                for seed, rho in entry["per_seed"].items()
            )
            out.append(f"- {strategy}: ρ = {_format_correlation(entry)} over {entry['n']} runs ({per_seed})")
    for seed, groups in (summary.get("same_orders") or {}).items():
        for names in groups:
            out += [
                "",
                f"Seed {seed}: {', '.join(names)} train the tasks in the same order (their difference is "
                "no effect of the order).",
            ]
    return out


def _general_ability_by_variant(study: Study, finished: dict) -> dict[str, dict]:
    """Per variant with probes, the general ability kept (probe after the last task / base) averaged over its
    finished seeds: ``{"mean", "per_probe", "seeds"}``."""
    from cpt.evaluation.continual import general_ability_kept

    out = {}
    for variant in study.variants:
        kept = []
        for seed in study.spec.seeds:
            matrix = read_json(study.runs_dir / study.run_name(variant, seed) / "eval" / "matrix.json") or {}
            if finished[(variant.name, seed)] and matrix.get("probes"):
                kept.append(general_ability_kept(matrix["probe_rows"], matrix["probes"]))
        if kept:
            per_probe = {
                name: float(np.mean(values))
                if (values := [k["per_probe"][name] for k in kept if k["per_probe"][name] is not None])
                else None
                for name in kept[0]["per_probe"]
            }
            means = [k["mean"] for k in kept if k["mean"] is not None]
            out[variant.name] = {
                "mean": float(np.mean(means)) if means else None,
                "per_probe": per_probe,
                "seeds": len(kept),
            }
    return out


def _fmt(interval: dict[str, float], signed: bool = False) -> str:
    spec = "+.3f" if signed else ".3f"
    if interval["estimate"] is None or not np.isfinite(interval["estimate"]):
        return "-"
    return f"{interval['estimate']:{spec}} [{interval['low']:{spec}}, {interval['high']:{spec}}]"


def format_statistics_tables(stats: dict[str, Any], variants: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per-variant intervals, then the paired differences (``StudyStatistics.as_dict()``).

    ``variants``: ``{"name", "strategy", "params"}`` per variant, in table order. Used by the
    study summary and by ``cpt compare`` when its runs carry several seeds.
    """
    confidence = round(100 * stats["confidence"])
    out: list[str] = [
        f"| variant | strategy | parameters | ACC [{confidence} % CI] | BWT | forgetting |",
        "|---|---|---|---|---|---|",
    ]
    for variant in variants:
        metrics = stats["variants"][variant["name"]]
        params = ", ".join(f"{k}={v}" for k, v in variant["params"].items()) or "-"
        out.append(
            f"| {variant['name']} | {variant['strategy']} | {params} | {_fmt(metrics['acc'])} | "
            f"{_fmt(metrics['bwt'], True)} | {_fmt(metrics['forgetting'])} |"
        )
    if stats["pairs"]:
        counts = {m: sum(pair[m]["distinguishable"] for pair in stats["pairs"]) for m in METRICS}
        out += [
            "",
            (
                f"Paired differences A − B ({confidence} % CI); **bold**: the interval excludes 0 (distinguishable). "
                f"Distinguishable pairs: ACC {counts['acc']}/{len(stats['pairs'])}, "
                f"BWT {counts['bwt']}/{len(stats['pairs'])}, forgetting {counts['forgetting']}/{len(stats['pairs'])}."
            ),
            "",
            "| A | B | ΔACC | ΔBWT | Δforgetting |",
            "|---|---|---|---|---|",
        ]
        for pair in stats["pairs"]:
            cells = [_fmt(pair[m], True) for m in METRICS]
            cells = [f"**{cell}**" if pair[m]["distinguishable"] else cell for cell, m in zip(cells, METRICS)]
            out.append(f"| {pair['a']} | {pair['b']} | " + " | ".join(cells) + " |")
    return out


def format_summary(summary: dict[str, Any]) -> str:
    out = [f"# Study {summary['study']}", "", f"Base recipe: `{summary['recipe']}`; seeds {summary['seeds']}."]
    stats = summary.get("statistics")
    if summary["pending_runs"]:
        out += ["", f"Pending runs (not in the statistics): {', '.join(summary['pending_runs'])}."]
    out += _format_orders(summary)
    if stats is None:
        return "\n".join(out + _format_correlations(summary) + ["", summary["note"], ""])
    out += ["", f"Seeds in the statistics: {stats['seeds']}; {stats['resamples']} resamples. {summary['note']}.", ""]
    out += format_statistics_tables(stats, summary["variants"])
    if summary.get("general_ability_kept"):  # probes: score after the last task / the base's, mean over seeds
        out += ["", "| variant | general ability kept (mean over probes) | per probe |", "|---|---|---|"]
        for name, kept in summary["general_ability_kept"].items():
            per_probe = ", ".join(
                f"{probe} {'-' if v is None else f'{v:.3f}'}" for probe, v in kept["per_probe"].items()
            )
            mean = "-" if kept["mean"] is None else f"{kept['mean']:.3f}"
            out.append(f"| {name} | {mean} | {per_probe} |")
    out += _format_correlations(summary)
    costs = summary["costs"]
    out += [
        "",
        (
            f"Cost: {costs['train_seconds']:.0f} s training ({costs['experts_trained']} experts trained, "
            f"{costs['experts_reused']} reused from the cache), {costs['eval_seconds']:.0f} s evaluation, "
            f"{costs['integration_seconds']:.1f} s integration."
        ),
        "",
    ]
    plans = list((summary.get("plans") or {}).values())
    if plans:  # planning's own cost (its experts are cached: the θ0 variants of the given order reuse them)
        seconds = sum(plan.get("seconds", {}).get("total", 0.0) for plan in plans)
        trained = sum(not hit for plan in plans for hit in plan.get("experts_from_cache", []))
        out[-1:] = [
            f"Planning: {seconds:.0f} s over {len(plans)} seed{'s' if len(plans) != 1 else ''} ({trained} experts trained for it).",
            "",
        ]
    return "\n".join(out)


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summary["statistics"]
    names = [variant["name"] for variant in summary["variants"]]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 0.5 * len(names) + 1.8), sharey=True)
    for axis, metric in zip(axes, METRICS):
        values = [stats["variants"][name][metric] for name in names]
        estimate = np.array([v["estimate"] for v in values], dtype=float)
        errors = np.array(
            [[v["estimate"] - v["low"] for v in values], [v["high"] - v["estimate"] for v in values]], dtype=float
        )
        axis.errorbar(estimate, np.arange(len(names)), xerr=np.nan_to_num(errors), fmt="o", capsize=4)
        axis.set_title(f"{metric} ({round(100 * stats['confidence'])} % CI)")
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(np.arange(len(names)), names)
    axes[0].invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(study: Study) -> dict[str, Any]:
    summary = build_summary(study)
    text = format_summary(summary)
    if summary.get("statistics") is not None:
        try:
            plot_summary(summary, study.root / "summary.png")
            text += "\n![ACC, BWT and forgetting with intervals](summary.png)\n"
        except Exception as exc:  # noqa: BLE001 - the table matters more than the plot
            text += f"\n(could not draw summary.png: {type(exc).__name__}: {exc})\n"
    summary["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(study.root / "summary.json", summary)
    atomic_write_text(study.root / "summary.md", text)
    return summary


__all__ = [
    "build_summary",
    "format_statistics_tables",
    "format_summary",
    "manifest_seconds",
    "read_run_outcomes",
    "write_summary",
]
