"""``cpt study STUDY.yaml``: every variant on every seed, shared experts and base rows, one summary.

Layout of a study folder (``<output_dir>/<name>/``)::

    study.yaml                      the study file as run
    runs/<variant>-seed<s>/         one normal run directory per (variant, seed) (`cpt report` reads it)
    summary.json, summary.md        per variant ACC/BWT/forgetting with 95 % intervals; every pair's difference
    summary.png                     the intervals as error bars (written by :mod:`cpt.study.summary`)

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
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from cpt.io import atomic_write_json, atomic_write_text, read_json
from cpt.stopping import raise_if_stop_requested
from cpt.study.spec import Study
from cpt.study.summary import run_finished, write_summary

#: How often a process waiting on another (a plan, merges it will read) looks again, in seconds.
POLL_SECONDS = 10.0


def log(message: str) -> None:
    print(f"[cpt study] {message}", file=sys.stderr, flush=True)


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


def shared_merge_caches(producers: dict[str, str], root: Path) -> dict[str, Any]:
    """``{run name: GCWMMergeCache}`` for the GCWM runs of one seed that compute the same ``m_t`` chain
    (``producers``, :func:`merge_producers`): the first to run stores each merge, the others read it
    (entries are content-addressed, so a merge is only ever read by a run whose inputs are the same
    bytes). Other runs get no cache and compute as usual."""
    from cpt.merging.gcwm import GCWMMergeCache

    return {name: GCWMMergeCache(root) for name in producers}


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


#: What a finished run of a study no longer needs (``keep_weights: false``, :mod:`cpt.study.spec`).
WEIGHT_FOLDERS = ("state", "history", "strategy", "work")


def remove_weights(run_dir: Path) -> bool:
    """Remove a finished run's weights (:data:`WEIGHT_FOLDERS`) and record it in its manifest; True when
    anything was removed. The manifest is written first, so a run stopped part-way says so and the
    next call removes the rest."""
    from cpt.run_directory import RunDirectory, utc_now

    present = [run_dir / name for name in WEIGHT_FOLDERS if (run_dir / name).exists()]
    if not present:
        return False
    directory = RunDirectory(run_dir)
    manifest = directory.read_manifest()
    manifest.setdefault("weights_removed", utc_now())
    directory.write_manifest(manifest)
    for folder in present:
        shutil.rmtree(folder, ignore_errors=True)
    return True


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
        merge_caches = shared_merge_caches(producers, study.root / "merges")
        by_name = {recipe.name: recipe for recipe in recipes}
        first = study.spec.seeds.index(seed) * len(recipes)
        labels = {
            recipe.name: f"[{first + index + 1}/{self.total}] {recipe.name}" for index, recipe in enumerate(recipes)
        }
        put_off = []
        for recipe in recipes:
            producer = by_name.get(producers.get(recipe.name, recipe.name))
            if producer is not recipe and not run_finished(producer.run_dir) and _held_elsewhere(producer.run_dir):
                log(f"{labels[recipe.name]}: put off until {producer.name} (another process) has stored its merges")
                put_off.append((recipe, producer))
                continue
            self.take(recipe, labels[recipe.name], recipes, merge_caches)
        for recipe, producer in put_off:
            while _held_elsewhere(producer.run_dir) and not run_finished(producer.run_dir):
                time.sleep(POLL_SECONDS)
            self.take(recipe, labels[recipe.name], recipes, merge_caches)
        # A seed's merges are never another seed's (other experts): keep the disk to one seed's chain —
        # once every run of the seed is finished (another process may still be reading them).
        if all(run_finished(recipe.run_dir, recipe.fingerprint()) for recipe in recipes):
            shutil.rmtree(study.root / "merges", ignore_errors=True)
        return True

    def finish(self, recipe) -> None:
        """A finished run keeps its results; its weights go unless the study keeps them (``keep_weights``)."""
        if not self.study.spec.keep_weights and remove_weights(recipe.run_dir):
            log(f"{recipe.name}: weights removed (keep_weights: false); results kept")

    def take(self, recipe, label: str, seed_recipes: list, merge_caches: dict) -> None:
        """Run (or resume) one run under its run lock, unless it is finished or another process holds it."""
        from cpt.lock import RunLock, RunLockedError
        from cpt.preflight import check_disk_space_for
        from cpt.runner import TaskSequenceRunner

        raise_if_stop_requested()  # a SIGTERM that a library swallowed (cpt.stopping)
        if run_finished(recipe.run_dir, recipe.fingerprint()):
            log(f"{label}: finished before")
            self.finish(recipe)
            return
        lock = RunLock(recipe.run_dir)
        try:
            lock.acquire()
        except RunLockedError:
            log(f"{label}: running in another process, skipped")
            self.busy.append(recipe.name)
            return
        try:
            if run_finished(recipe.run_dir, recipe.fingerprint()):  # finished by another process since the check
                log(f"{label}: finished before")
                self.finish(recipe)
                return
            log(label)
            # Each run stages a state beside the last one: a disk filled by earlier runs stops the study here, in
            # one line, rather than mid-integration (the preflight of `cpt run`, cpt.preflight).
            check_disk_space_for(recipe)
            merge_cache = merge_caches.get(recipe.name)
            runner = TaskSequenceRunner(recipe, expert_cache=self.cache, merge_cache=merge_cache)
            # The seed's base row is evaluated once, by its first run to get there; the others copy it.
            base_source = next((other.run_dir for other in seed_recipes if run_finished(other.run_dir)), None)
            if base_source is not None and _share_base_row(runner, base_source):
                log(f"{recipe.name}: base row copied from {base_source.name}")
            runner.run()
            if merge_cache is not None:
                log(
                    f"{recipe.name}: GCWM merges shared with the seed's other variants of the same m_t: "
                    f"{merge_cache.hits} tensors read, {merge_cache.misses} merged"
                )
            self.finish(recipe)
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
        # every measured step conflict c(S, j): the predicted C of any order studied (cpt.study.summary)
        "conflicts": [
            {"previous": [result.tasks[i] for i in sorted(previous)], "task": result.tasks[task], "conflict": value}
            for (previous, task), value in plan.conflicts.items()
        ],
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


__all__ = ["WEIGHT_FOLDERS", "merge_producers", "plan_seed", "remove_weights", "run_study", "shared_merge_caches"]
