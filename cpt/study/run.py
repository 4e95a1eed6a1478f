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

Several processes (``--workers``, :mod:`cpt.study.workers`): every run is taken under its run
lock (:mod:`cpt.lock`) and a seed's plan under ``.plan-seed<s>.lock``; a process skips the runs
another holds and puts off what it cannot start yet (:class:`_StudyWorker`).
"""

from __future__ import annotations

import contextlib
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
from cpt.study.statistics import METRICS, RunOutcomes, bootstrap_study, pooled_spearman

#: How often a process waiting on another (a plan, merges it will read) looks again, in seconds.
POLL_SECONDS = 10.0


def log(message: str) -> None:
    print(f"[cpt study] {message}", file=sys.stderr, flush=True)


def _finished(run_dir: Path, fingerprint: str | None = None) -> bool:
    manifest = read_json(run_dir / "manifest.json")
    return bool(
        manifest
        and manifest.get("status") == "complete"
        and (fingerprint is None or manifest.get("recipe_fingerprint") == fingerprint)
    )


def merge_producers(recipes: list) -> dict[str, str]:
    """``{run name: name of the run that computes its merges}`` for the GCWM runs of one seed that
    share their ``m_t`` chain with another (the producer is the group's first run, mapped to itself).

    Two GCWM variants on the same task order whose parameters differ only in what acts after the
    merge (``step_coef``, ``decay``, ``non_target``; :func:`cpt.merging.gcwm.shares_merges`) merge
    the same experts into the same ``m_1, m_2, …`` (METHOD §2.8).
    """
    from cpt.merging.gcwm import shares_merges
    from cpt.strategies import get_strategy

    gcwm = [
        (recipe, get_strategy("gcwm").make_params(recipe.strategy.params))
        for recipe in recipes
        if recipe.strategy.name == "gcwm"
    ]

    def order(recipe) -> list[str]:
        return [task.name for task in recipe.tasks]

    producers = {}
    for recipe, params in gcwm:
        group = [
            other
            for other, other_params in gcwm
            if order(other) == order(recipe) and (other is recipe or shares_merges(other_params, params))
        ]
        if len(group) > 1:
            producers[recipe.name] = group[0].name
    return producers


def shared_merge_caches(recipes: list, root: Path) -> dict[str, Any]:
    """``{run name: GCWMMergeCache}`` for the GCWM runs of one seed that compute the same ``m_t`` chain
    (:func:`merge_producers`): the first to run stores each merge, the others read it (entries are
    content-addressed, so a merge is only ever read by a run whose inputs are the same bytes). Other
    runs get no cache and compute as usual."""
    from cpt.merging.gcwm import GCWMMergeCache

    return {name: GCWMMergeCache(root) for name in merge_producers(recipes)}


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
    tasks = [task.name for task in runner.recipe.tasks]
    if sorted(tasks) != sorted(matrix["tasks"]):
        return False
    runner.prepare_run_dir()
    num_tasks = len(tasks)
    column = {task: j for j, task in enumerate(matrix["tasks"])}  # the source may train the tasks in another order
    shared = {
        "tasks": tasks,
        "rows": [[matrix["rows"][0][column[task]] for task in tasks]] + [None] * num_tasks,
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
    from cpt.study.expert_cache import ExpertCache

    study.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(study.root / "study.yaml", study.source.read_text(encoding="utf-8"))
    cache = ExpertCache()
    if not summary_only:
        log(
            f"{study.name}: {len(study.variants)} variants × {len(study.spec.seeds)} seeds → {study.root} "
            f"(experts cached in {cache.root})"
        )
        _StudyWorker(study, cache).run()
    else:
        load_plans(study)
    summary = write_summary(study)
    log(f"summary: {study.root / 'summary.md'}")
    return summary


def _held_elsewhere(run_dir: Path) -> bool:
    """Whether another live process holds ``run_dir``'s run lock (:mod:`cpt.lock`)."""
    from cpt.lock import RunLock, holder_is_stale

    holder = RunLock(run_dir).read_holder()
    return holder is not None and (holder == {} or not holder_is_stale(holder))


class _StudyWorker:
    """One process's share of a study: every run that no other process holds, in the study's order.

    Several ``cpt study`` processes may work on one study (``--workers``, or one per GPU): a run is
    taken under its run lock (the one ``cpt run`` takes), a seed's plan under a plan lock. What
    cannot start yet is put off rather than waited for — a seed whose plan another process is
    computing, a run that reads GCWM merges another process is still computing (run now, it would
    solve them again) — and taken up once nothing else is left.
    """

    def __init__(self, study: Study, cache):
        self.study = study
        self.cache = cache
        self.total = len(study.variants) * len(study.spec.seeds)
        self.busy: list[str] = []

    def run(self) -> None:
        study = self.study
        later_seeds = [seed for seed in study.spec.seeds if not self.run_seed(seed, wait=False)]
        for seed in later_seeds:  # planned by another process meanwhile (or waited for)
            self.run_seed(seed, wait=True)
        if self.busy:
            log(
                f"{len(self.busy)} run(s) were running in another process ({', '.join(self.busy)}): the summary "
                "below leaves them out; the process that finishes last writes the complete one"
            )

    def run_seed(self, seed: int, *, wait: bool) -> bool:
        """Every run of ``seed`` this process can take; False (nothing run) when its plan is being
        computed by another process and ``wait`` is False."""
        study = self.study
        if study.needs_plans and plan_seed(study, seed, self.cache, wait=wait) is None:
            log(f"seed {seed}: another process is planning its task order; its runs come later")
            return False
        recipes = [study.recipe_for(variant, seed) for variant in study.variants]
        producers = merge_producers(recipes)
        merge_caches = shared_merge_caches(recipes, study.root / "merges")
        by_name = {recipe.name: recipe for recipe in recipes}
        first = study.spec.seeds.index(seed) * len(recipes)
        labels = {
            recipe.name: f"[{first + index + 1}/{self.total}] {recipe.name}" for index, recipe in enumerate(recipes)
        }
        put_off = []
        for recipe in recipes:
            producer = by_name.get(producers.get(recipe.name, recipe.name))
            if producer is not recipe and not _finished(producer.run_dir) and _held_elsewhere(producer.run_dir):
                log(f"{labels[recipe.name]}: put off until {producer.name} (another process) has stored its merges")
                put_off.append((recipe, producer))
                continue
            self.take(recipe, labels[recipe.name], recipes, merge_caches)
        for recipe, producer in put_off:
            while _held_elsewhere(producer.run_dir) and not _finished(producer.run_dir):
                time.sleep(POLL_SECONDS)
            self.take(recipe, labels[recipe.name], recipes, merge_caches)
        # A seed's merges are never another seed's (other experts): keep the disk to one seed's chain —
        # once every run of the seed is finished (another process may still be reading them).
        if all(_finished(recipe.run_dir, recipe.fingerprint()) for recipe in recipes):
            shutil.rmtree(study.root / "merges", ignore_errors=True)
        return True

    def take(self, recipe, label: str, seed_recipes: list, merge_caches: dict) -> None:
        """Run (or resume) one run under its run lock, unless it is finished or another process holds it."""
        from cpt.lock import RunLock, RunLockedError
        from cpt.runner import TaskSequenceRunner

        if _finished(recipe.run_dir, recipe.fingerprint()):
            log(f"{label}: finished before")
            return
        lock = RunLock(recipe.run_dir)
        try:
            lock.acquire()
        except RunLockedError:
            log(f"{label}: running in another process, skipped")
            self.busy.append(recipe.name)
            return
        try:
            if _finished(recipe.run_dir, recipe.fingerprint()):  # finished by another process since the check
                log(f"{label}: finished before")
                return
            log(label)
            merge_cache = merge_caches.get(recipe.name)
            runner = TaskSequenceRunner(recipe, expert_cache=self.cache, merge_cache=merge_cache)
            # The seed's base row is evaluated once, by its first run to get there; the others copy it.
            base_source = next((other.run_dir for other in seed_recipes if _finished(other.run_dir)), None)
            if base_source is not None and _share_base_row(runner, base_source):
                log(f"{recipe.name}: base row copied from {base_source.name}")
            runner.run()
            if merge_cache is not None:
                log(
                    f"{recipe.name}: GCWM merges shared with the seed's other variants of the same m_t: "
                    f"{merge_cache.hits} tensors read, {merge_cache.misses} merged"
                )
        finally:
            lock.release()


# ---------------------------------------------------------------------- planned orders (METHOD §7)
def _planning_recipe(study: Study, seed: int):
    """The base recipe in its given order with seed ``seed``: its θ0 experts are those the planner needs, and
    the same (cache keys) as a given-order θ0 variant's of that seed."""
    from cpt.recipe import validate_recipe

    data = {**study.base_recipe, "name": f"{study.name}-plan-seed{seed}", "seed": seed}
    return validate_recipe(data, source=f"{study.source} (planning, seed {seed})")


def _plan_is_current(record: dict | None, study: Study, fingerprint: str) -> bool:
    return bool(record and record.get("recipe_fingerprint") == fingerprint and record.get("given") == study.task_names)


def plan_seed(study: Study, seed: int, cache=None, *, wait: bool = True) -> dict[str, Any] | None:
    """The planned order of ``seed`` (METHOD §7, ``cpt plan``), computed once per (study, seed).

    Read from ``plan-seed<s>.json`` when that file is for the same base recipe (its fingerprint) and
    task list; otherwise planned with :func:`cpt.planning.plan.plan_recipe` — every task's expert
    from θ0 through the expert cache, so planning trains nothing when the experts are cached (and a
    given-order θ0 variant of the seed later reuses the experts planning trained) — and written
    there. Sets ``study.plans[seed]`` and returns the record. One process plans a seed: while another
    holds its plan lock, this waits for it — or, with ``wait=False``, returns None.
    """
    recipe = _planning_recipe(study, seed)
    fingerprint = recipe.fingerprint()
    path = study.plan_path(seed)
    record = read_json(path)
    if _plan_is_current(record, study, fingerprint):
        log(f"seed {seed}: planned order {' → '.join(record['planned'])} (from {path.name})")
        study.plans[seed] = record
        return record
    with _plan_lock(path.with_suffix(""), seed, wait) as held:
        if not held:
            return None
        record = read_json(path)
        if _plan_is_current(record, study, fingerprint):
            log(f"seed {seed}: planned order {' → '.join(record['planned'])} (from {path.name})")
        else:
            record = _plan_and_write(study, seed, recipe, fingerprint, cache)
    study.plans[seed] = record
    return record


@contextlib.contextmanager
def _plan_lock(target: Path, seed: int, wait: bool):
    """Hold the lock of ``target`` (:class:`cpt.lock.RunLock`) and yield True; while another live process
    holds it, wait (``wait``) or yield False."""
    from cpt.lock import RunLock, RunLockedError

    lock = RunLock(target)
    announced = False
    while True:
        try:
            lock.acquire()
            break
        except RunLockedError:
            if not wait:
                yield False
                return
            if not announced:
                log(f"seed {seed}: another process is planning the task order; waiting for it")
                announced = True
            time.sleep(POLL_SECONDS)
    try:
        yield True
    finally:
        lock.release()


def _plan_and_write(study: Study, seed: int, recipe, fingerprint: str, cache) -> dict[str, Any]:
    """Plan seed ``seed``'s order (every θ0 expert through ``cache``) and write ``plan-seed<s>.json``."""
    from cpt.planning.plan import plan_recipe

    log(f"seed {seed}: planning the task order (METHOD §7)")
    result = plan_recipe(recipe, cache=cache)
    plan = result.plan
    record = {
        "seed": seed,
        "given": result.tasks,
        "planned": result.planned_tasks,
        "reverse_planned": result.planned_tasks[::-1],
        "method": plan.method,
        "cost": plan.cost,
        "step_conflicts": plan.step_conflicts,
        "given_cost": plan.given_cost,
        "given_step_conflicts": plan.given_step_conflicts,
        "measured": plan.measured,
        "seconds": result.seconds,
        "experts_from_cache": [bool(expert.cache_hit) for expert in result.experts],
        "recipe_fingerprint": fingerprint,
    }
    path = study.plan_path(seed)
    atomic_write_json(path, record)
    log(
        f"seed {seed}: planned order {' → '.join(record['planned'])} (C = {plan.cost:.4f}, given "
        f"{plan.given_cost:.4f}; {sum(record['experts_from_cache'])}/{len(result.experts)} experts from the "
        f"cache, {result.seconds['total']:.1f} s) → {path.name}"
    )
    return record


def load_plans(study: Study) -> None:
    """Read the current ``plan-seed<s>.json`` files into ``study.plans`` (for a summary without running)."""
    if not study.needs_plans:
        return
    for seed in study.spec.seeds:
        record = read_json(study.plan_path(seed))
        if _plan_is_current(record, study, _planning_recipe(study, seed).fingerprint()):
            study.plans[seed] = record


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
    finished = {(v.name, s): _finished(study.runs_dir / study.run_name(v, s)) for v in study.variants for s in seeds}
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
        summary["plans"] = {str(seed): study.plans[seed] for seed in seeds if seed in study.plans}
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
        for name, by_seed in orders.items():
            cells = [" → ".join(by_seed[seed]) if by_seed.get(seed) else "(not planned yet)" for seed in seeds]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
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


__all__ = ["Variant", "build_summary", "format_summary", "read_run_outcomes", "run_study", "write_summary"]
