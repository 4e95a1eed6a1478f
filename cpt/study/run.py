"""``cpt study STUDY.yaml``: every variant on every seed, shared experts and base rows, one summary.

Layout of a study folder (``<output_dir>/<name>/``)::

    study.yaml                      the study file as run
    runs/<variant>-seed<s>/         one normal run directory per (variant, seed) (`cpt report` reads it)
    summary.json, summary.md        per variant ACC/BWT/forgetting with 95 % intervals; every pair's difference
    summary.png                     the intervals as error bars

What is shared (METHOD §6):

* **experts** — every run uses the expert cache (:mod:`cpt.study.expert_cache`), so an
  expert trained from θ0 is trained once per (task, seed) and reused by every θ0-based
  variant (and by a later study). Training-time strategies (sequential, replay, EWC) train
  as usual.
* **the base row** — the base model's evaluation depends only on the base recipe and the
  seed, not on the strategy: the first run of a seed evaluates it, the later ones copy it
  (``eval/matrix.json`` row 0 and the per-example files ``eval/0_<task>.jsonl``).

Resuming: runs go seed by seed, variant by variant; a finished run is skipped, an
unfinished one resumes in its run directory (`cpt run` semantics), and the summary is
rebuilt from the finished runs at the end (and whenever the study is started again).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cpt.errors import CptError
from cpt.io import atomic_write_json, atomic_write_text, read_json
from cpt.study.spec import Study, Variant
from cpt.study.statistics import METRICS, RunOutcomes, bootstrap_study


def log(message: str) -> None:
    print(f"[cpt study] {message}", file=sys.stderr, flush=True)


def _finished(run_dir: Path, fingerprint: str | None = None) -> bool:
    manifest = read_json(run_dir / "manifest.json")
    return bool(
        manifest
        and manifest.get("status") == "complete"
        and (fingerprint is None or manifest.get("recipe_fingerprint") == fingerprint)
    )


def _share_base_row(runner, source: Path) -> bool:
    """Give a new run the base row of ``source`` (a run of the same base recipe and seed) instead of re-evaluating.

    The run directory is created by the runner itself (``prepare_run_dir``), then row 0 and the
    base's per-example files are copied in; the runner then finds row 0 present and skips it.
    """
    matrix = read_json(source / "eval" / "matrix.json")
    if not matrix or not matrix.get("rows") or matrix["rows"][0] is None:
        return False
    if runner.recipe.evaluation.rows == "all" and None in matrix["rows"][0]:
        return False  # the source skipped base entries (evaluation.rows: needed) that this run scores
    target = runner.rundir
    if target.matrix_path.exists():
        return False  # a resumed run keeps what it has
    runner.prepare_run_dir()
    num_tasks = len(matrix["tasks"])
    shared = {
        "tasks": matrix["tasks"],
        "rows": [matrix["rows"][0]] + [None] * num_tasks,
        "expert_scores": [None] * num_tasks,
    }
    if matrix.get("probes"):  # the base's probe scores too (their 0_probe-*.jsonl files are copied below)
        shared.update(probes=matrix["probes"], probe_rows=[matrix["probe_rows"][0]] + [None] * num_tasks)
    atomic_write_json(target.matrix_path, shared)
    for per_example in (source / "eval").glob("0_*.jsonl"):
        shutil.copyfile(per_example, target.root / "eval" / per_example.name)
    manifest = target.read_manifest()
    manifest["base_row_from"] = source.name
    target.write_manifest(manifest)
    return True


def run_study(study: Study, *, summary_only: bool = False) -> dict[str, Any]:
    """Run (or resume) every (variant, seed) of ``study``, then write and return its summary."""
    from cpt.runner import TaskSequenceRunner
    from cpt.study.expert_cache import ExpertCache

    study.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(study.root / "study.yaml", study.source.read_text(encoding="utf-8"))
    cache = ExpertCache()
    total = len(study.variants) * len(study.spec.seeds)
    done = 0
    if not summary_only:
        log(
            f"{study.name}: {len(study.variants)} variants × {len(study.spec.seeds)} seeds → {study.root} "
            f"(experts cached in {cache.root})"
        )
        for seed in study.spec.seeds:
            base_source: Path | None = None
            for variant in study.variants:
                done += 1
                recipe = study.recipe_for(variant, seed)
                if _finished(recipe.run_dir, recipe.fingerprint()):
                    log(f"[{done}/{total}] {recipe.name}: finished before")
                else:
                    log(f"[{done}/{total}] {recipe.name}")
                    runner = TaskSequenceRunner(recipe, expert_cache=cache)
                    if base_source is not None and _share_base_row(runner, base_source):
                        log(f"{recipe.name}: base row copied from {base_source.name}")
                    runner.run()
                if base_source is None:
                    base_source = recipe.run_dir
    summary = write_summary(study)
    log(f"summary: {study.root / 'summary.md'}")
    return summary


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


def _run_costs(run_dir: Path) -> dict[str, float]:
    manifest = read_json(run_dir / "manifest.json") or {}
    tasks = manifest.get("tasks", [])
    hits = sum(1 for t in tasks if (t.get("expert_cache") or {}).get("hit"))
    return {
        "train_seconds": sum(t.get("train_seconds", 0.0) for t in tasks),
        "eval_seconds": manifest.get("base_eval_seconds", 0.0) + sum(t.get("eval_seconds", 0.0) for t in tasks),
        "integration_seconds": sum(t.get("integration_seconds", 0.0) for t in tasks),
        "experts_trained": len(tasks) - hits,
        "experts_reused": hits,
        "base_row_copied": bool(manifest.get("base_row_from")),
    }


# ---------------------------------------------------------------------- the summary
def build_summary(study: Study) -> dict[str, Any]:
    seeds = study.spec.seeds
    finished = {(v.name, s): _finished(study.runs_dir / study.run_name(v, s)) for v in study.variants for s in seeds}
    complete_seeds = [s for s in seeds if all(finished[(v.name, s)] for v in study.variants)]
    pending = [study.run_name(v, s) for v in study.variants for s in seeds if not finished[(v.name, s)]]
    summary: dict[str, Any] = {
        "study": study.name,
        "recipe": study.spec.recipe,
        "seeds": seeds,
        "seeds_used": complete_seeds,
        "pending_runs": pending,
        "variants": [{"name": v.name, "strategy": v.strategy, "params": v.params} for v in study.variants],
    }
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
    if stats is None:
        return "\n".join(out + ["", summary["note"], ""])
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


__all__ = ["Variant", "build_summary", "format_summary", "read_run_outcomes", "run_study", "write_summary"]
