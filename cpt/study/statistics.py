"""Confidence intervals for continual-learning metrics: the paired cluster bootstrap (METHOD §6).

A study runs every variant (strategy + parameters) on the same seeds and eval sets. For a
metric ``M`` (ACC, BWT, forgetting; METHOD §5) this module draws ``B`` resamples, each of
which

1. resamples the seeds with replacement (``S`` draws from the ``S`` seeds), and
2. within each drawn seed, resamples every task's eval examples with replacement
   (``n`` draws from that seed's ``n`` examples of the task; a seed drawn twice gets two
   independent example resamples, the usual two-stage cluster bootstrap),

and recomputes ``M`` on the resample: the per-seed accuracy matrices are rebuilt from the
resampled examples (the *same* example indices for every row of that seed, since every row
is scored on the same eval set; examples are paired across variants by task *name*, so runs
that train the tasks in different orders — an ordering study — are paired correctly), the metric is computed per drawn seed and averaged over
the draws. Every variant sees the same resamples, so for two variants A and B the values
``M_A − M_B`` of one resample form the paired difference's bootstrap distribution. The
95 % interval is its 2.5 / 97.5 percentiles; A and B are *distinguishable* when it
excludes 0. Resampling is seeded, so a summary is reproducible.

When a run has no per-example outcomes (only its score matrix), only the seeds can be
resampled: :func:`bootstrap_study` then works on the scores (``example_level=False``) and
the intervals reflect seed-to-seed variation only.

Usage::

    from cpt.study.statistics import RunOutcomes, bootstrap_study

    runs = [RunOutcomes.from_arrays("ties", seed=0, tasks=["a", "b"], correct={1: {"a": [1, 0, 1]}, ...}), ...]
    summary = bootstrap_study(runs, resamples=2000, seed=0)
    summary.variants["ties"]["acc"]          # Interval(estimate, low, high)
    summary.pairs[("ties", "gcwm")]["acc"]    # PairedDifference(..., distinguishable=True)
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cpt.errors import CptError

#: The metrics a study reports with intervals (METHOD §5 definitions, cpt.evaluation.continual).
METRICS = ("acc", "bwt", "forgetting")


@dataclass
class RunOutcomes:
    """The per-example outcomes of one finished run (one variant, one seed).

    Args:
        variant: the study variant's name (runs of one variant share it).
        seed: the run's seed; runs of different variants with the same seed are paired.
        tasks: task names in training order (``T`` of them). Runs of one study have the same task
            set; their orders may differ (outcomes are paired by task name, not position).
        correct: ``correct[row][task]`` is a 1-D array of 0/1 outcomes over that task's eval
            examples, for rows ``1..T`` (row ``t`` = the state after task ``t``; row 0, the
            base, is allowed and ignored by ACC/BWT/forgetting). Every row of a task lists
            the same examples in the same order (see ``ids``).
        ids: optional ``ids[task]``, the eval example ids in the order of ``correct``;
            pairing checks use them.
        scores: optional ``scores[row][task]`` accuracies for runs without per-example
            outcomes (then ``correct`` is empty); only seeds are resampled for such runs.
    """

    variant: str
    seed: int
    tasks: list[str]
    correct: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    ids: dict[str, list[str]] | None = None
    scores: dict[int, dict[str, float]] | None = None

    @classmethod
    def from_arrays(
        cls,
        variant: str,
        seed: int,
        tasks: Sequence[str],
        correct: Mapping[int, Mapping[str, Sequence]],
        ids: Mapping[str, Sequence[str]] | None = None,
    ) -> RunOutcomes:
        arrays = {
            int(row): {task: np.asarray(values, dtype=np.float64) for task, values in per_task.items()}
            for row, per_task in correct.items()
        }
        return cls(variant, int(seed), list(tasks), arrays, {t: list(v) for t, v in ids.items()} if ids else None)

    @property
    def has_examples(self) -> bool:
        return bool(self.correct)

    def score_matrix(self) -> np.ndarray:
        """``R[i-1][j-1]`` for rows/tasks 1..T (the base row dropped), from outcomes or scores."""
        T = len(self.tasks)
        matrix = np.full((T, T), np.nan)
        for i in range(1, T + 1):
            for j, task in enumerate(self.tasks):
                if self.has_examples:
                    values = self.correct.get(i, {}).get(task)
                    if values is not None and len(values):
                        matrix[i - 1, j] = float(np.mean(values))
                elif self.scores is not None and self.scores.get(i, {}).get(task) is not None:
                    matrix[i - 1, j] = float(self.scores[i][task])
        return matrix


@dataclass(frozen=True)
class Interval:
    """A point estimate (the metric on the observed data) and its percentile interval."""

    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class PairedDifference(Interval):
    """``M_A − M_B`` with its interval; distinguishable when the interval excludes 0."""

    distinguishable: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "distinguishable": self.distinguishable}


@dataclass
class StudyStatistics:
    """What :func:`bootstrap_study` returns."""

    variants: dict[str, dict[str, Interval]]
    pairs: dict[tuple[str, str], dict[str, PairedDifference]]
    seeds: list[int]
    tasks: list[str]
    resamples: int
    confidence: float
    example_level: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds,
            "tasks": self.tasks,
            "resamples": self.resamples,
            "confidence": self.confidence,
            "example_level": self.example_level,
            "variants": {
                name: {m: iv.as_dict() for m, iv in metrics.items()} for name, metrics in self.variants.items()
            },
            "pairs": [
                {"a": a, "b": b, **{m: d.as_dict() for m, d in metrics.items()}}
                for (a, b), metrics in self.pairs.items()
            ],
        }


# ---------------------------------------------------------------------- metrics on stacks of matrices
def metrics_from_matrices(R: np.ndarray) -> dict[str, np.ndarray]:
    """ACC, BWT and forgetting (METHOD §5) of accuracy matrices ``R[..., i-1, j-1]`` (rows 1..T).

    Vectorised over any leading axes. ``forgetting_j = max_{1≤i<T} R[i][j] − R[T][j]``
    (the base row excluded, as in :mod:`cpt.evaluation.continual`). BWT and forgetting are
    NaN for T = 1.
    """
    T = R.shape[-1]
    final = R[..., T - 1, :]
    acc = final.mean(axis=-1)
    if T < 2:
        nan = np.full(acc.shape, np.nan)
        return {"acc": acc, "bwt": nan, "forgetting": nan.copy()}
    diagonal = np.diagonal(R, axis1=-2, axis2=-1)[..., : T - 1]
    bwt = (final[..., : T - 1] - diagonal).mean(axis=-1)
    # max over rows i < T of column j, for j < T (only rows i ≥ j are after learning j, but §5 takes all i < T).
    best = R[..., : T - 1, : T - 1].max(axis=-2)
    forgetting = (best - final[..., : T - 1]).mean(axis=-1)
    return {"acc": acc, "bwt": bwt, "forgetting": forgetting}


# ---------------------------------------------------------------------- the bootstrap
def _check_runs(runs: Sequence[RunOutcomes]) -> tuple[list[str], list[int], list[str], bool]:
    if not runs:
        raise CptError("statistics: no finished runs to summarise")
    tasks = runs[0].tasks
    variants = list(dict.fromkeys(run.variant for run in runs))
    seeds = sorted({run.seed for run in runs})
    by_key = {}
    for run in runs:  # the same task set; the training order may differ (an ordering study, METHOD §7)
        if sorted(run.tasks) != sorted(tasks) or len(set(run.tasks)) != len(run.tasks):
            raise CptError(
                f"statistics: run {run.variant}/seed {run.seed} has tasks {run.tasks}, expected the tasks {tasks} "
                "(in any order)"
            )
        if (run.variant, run.seed) in by_key:
            raise CptError(f"statistics: two runs of variant {run.variant!r} with seed {run.seed}")
        by_key[(run.variant, run.seed)] = run
    missing = [f"{v}/seed {s}" for v in variants for s in seeds if (v, s) not in by_key]
    if missing:
        raise CptError(f"statistics: paired comparison needs every variant on every seed; missing {', '.join(missing)}")
    example_level = all(run.has_examples for run in runs)
    if example_level:
        from cpt.evaluation.continual import needed_entries

        T = len(tasks)
        needed = needed_entries(T)  # entries a run may lack (evaluation.rows: needed) are those no metric reads
        for seed in seeds:
            reference = by_key[(variants[0], seed)]
            for j, task in enumerate(tasks, start=1):
                n = len(reference.correct[T][task])
                for variant in variants:
                    run = by_key[(variant, seed)]
                    for row in range(1, T + 1):
                        values = run.correct.get(row, {}).get(task)
                        if values is None and j not in needed[row]:
                            continue
                        if values is None or len(values) != n or n == 0:
                            raise CptError(
                                f"statistics: {variant}/seed {seed} row {row} task {task!r} has "
                                f"{0 if values is None else len(values)} outcomes, expected {n} "
                                "(the same eval set in every row)"
                            )
                    if run.ids and reference.ids and run.ids.get(task) != reference.ids.get(task):
                        raise CptError(
                            f"statistics: {variant}/seed {seed} task {task!r} was scored on other eval examples than "
                            f"{variants[0]}/seed {seed}; paired runs need the same eval sets"
                        )
    return variants, seeds, tasks, example_level


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [100 * tail, 100 * (1 - tail)])
    return float(low), float(high)


def _check_bootstrap_settings(resamples: int, confidence: float) -> None:
    """One-line errors for settings no bootstrap can use (both resampling functions check them)."""
    if resamples < 1:
        raise CptError(f"statistics: resamples must be ≥ 1 (got {resamples})")
    if not 0 < confidence < 1:
        raise CptError(f"statistics: confidence must be in (0, 1) (got {confidence})")


def bootstrap_study(
    runs: Sequence[RunOutcomes],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    example_level: bool | None = None,
) -> StudyStatistics:
    """Per-variant intervals and paired differences of ACC, BWT and forgetting (METHOD §6).

    Args:
        runs: one :class:`RunOutcomes` per (variant, seed); every variant on every seed.
        resamples: B, the number of bootstrap resamples (METHOD §6: 2000).
        confidence: the interval's coverage (0.95 → the 2.5 / 97.5 percentiles).
        seed: seeds the resampling generator (reproducible summaries).
        example_level: resample eval examples within seeds; default: when every run has
            per-example outcomes. ``False`` resamples seeds only (score matrices).

    Returns a :class:`StudyStatistics`: the point estimate of each metric is its mean over
    seeds of the per-seed metric on the observed data.
    """
    _check_bootstrap_settings(resamples, confidence)
    variants, seeds, tasks, have_examples = _check_runs(runs)
    if example_level is None:
        example_level = have_examples
    elif example_level and not have_examples:
        raise CptError("statistics: example_level=True needs per-example outcomes in every run")
    by_key = {(run.variant, run.seed): run for run in runs}
    T, S = len(tasks), len(seeds)
    rng = np.random.default_rng(seed)

    # Stage 1: the drawn seeds of every resample, shared by all variants (paired).
    drawn = rng.integers(0, S, size=(resamples, S))  # indices into `seeds`
    # R_boot[variant]: (B, S, T, T) resampled accuracy matrices, one per drawn seed slot, rows and columns in
    # that run's training order (what metrics_from_matrices expects).
    observed = {v: np.stack([by_key[(v, s)].score_matrix() for s in seeds]) for v in variants}  # (S, T, T)
    if not example_level:
        R_boot = {v: observed[v][drawn] for v in variants}
    else:
        # Examples are paired by task *name*: column j below is task `tasks[j]` for every variant and seed,
        # whatever position the run trained it at; each run's columns are put in its own training order after.
        column_of = {task: j for j, task in enumerate(tasks)}
        training_columns = {
            v: np.array([[column_of[task] for task in by_key[(v, s)].tasks] for s in seeds]) for v in variants
        }  # (S, T): training position → name column
        R_boot = {v: np.empty((resamples, S, T, T)) for v in variants}
        for j, task in enumerate(tasks):
            sizes = np.array([len(by_key[(variants[0], s)].correct[T][task]) for s in seeds])
            width = int(sizes.max())
            n = sizes[drawn][..., None]  # (B, S, 1): the drawn seed's number of examples
            # Stage 2: example indices within each drawn seed, the same for every row and variant.
            index = np.floor(rng.random((resamples, S, width)) * n).astype(np.int64)
            valid = np.arange(width) < n  # slots beyond the drawn seed's n are padding
            counts = valid.sum(axis=-1)
            for v in variants:
                # padded[seed, row, example]: this task's outcomes per seed and row (rows 1..T)
                padded = np.zeros((S, T, width))
                for k, s in enumerate(seeds):
                    run = by_key[(v, s)]
                    for i in range(1, T + 1):
                        # an entry not evaluated (read by no metric, see _check_runs) stays NaN
                        padded[k, i - 1, : sizes[k]] = run.correct[i].get(task, np.nan) if i in run.correct else np.nan
                for i in range(T):
                    gathered = np.take_along_axis(padded[:, i, :][drawn], index, axis=-1)  # (B, S, width)
                    R_boot[v][:, :, i, j] = np.where(valid, gathered, 0.0).sum(axis=-1) / counts
        for v in variants:
            order = training_columns[v][drawn][:, :, None, :]  # (B, S, 1, T): each drawn seed's run's order
            R_boot[v] = np.take_along_axis(R_boot[v], np.broadcast_to(order, R_boot[v].shape), axis=-1)

    # A resample's metric: the per-seed metric averaged over its S drawn seed slots.
    boot_metrics = {
        v: {m: values.mean(axis=-1) for m, values in metrics_from_matrices(R_boot[v]).items()} for v in variants
    }
    point = {
        v: {m: float(np.mean(values)) for m, values in metrics_from_matrices(observed[v]).items()} for v in variants
    }

    summary_variants = {
        v: {m: Interval(point[v][m], *_interval(boot_metrics[v][m], confidence)) for m in METRICS} for v in variants
    }
    pairs: dict[tuple[str, str], dict[str, PairedDifference]] = {}
    for a, b in itertools.combinations(variants, 2):
        pairs[(a, b)] = {}
        for m in METRICS:
            low, high = _interval(boot_metrics[a][m] - boot_metrics[b][m], confidence)
            distinguishable = bool(np.isfinite(low) and (low > 0 or high < 0))
            pairs[(a, b)][m] = PairedDifference(point[a][m] - point[b][m], low, high, distinguishable)
    return StudyStatistics(summary_variants, pairs, seeds, list(tasks), resamples, confidence, example_level)


# ---------------------------------------------------------------------- conflict vs forgetting, pooled over seeds
@dataclass(frozen=True)
class PooledCorrelation:
    """Spearman's ρ of one signal against forgetting, pooled over seeds, with its cluster-bootstrap interval.

    Args:
        signal: the step signal (``conflict``, ``norm`` or ``sar``; :data:`cpt.report.statistics.SIGNALS`).
        n: pairs pooled (every seed's runs; the pairs whose signal is defined).
        seeds: the seeds (clusters) the pairs come from.
        rho: ρ of the pooled pairs (``None`` with ``reason``: too few pairs or a constant input).
        low, high: the percentile interval over the resamples where ρ is defined (``None`` when none is).
        per_seed: ρ of each seed's pairs alone (``None`` where undefined), to see how much seeds agree.
        undefined_resamples: resamples whose ρ is undefined (a constant signal or drop), left out of the interval.
        reason: why ``rho`` is undefined (the report's rule, :func:`cpt.report.statistics.spearman`).
    """

    signal: str
    n: int
    seeds: list[int]
    rho: float | None
    low: float | None
    high: float | None
    per_seed: dict[int, float | None]
    undefined_resamples: int = 0
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "seeds": self.seeds,
            "rho": self.rho,
            "low": self.low,
            "high": self.high,
            "per_seed": {str(seed): rho for seed, rho in self.per_seed.items()},
            "undefined_resamples": self.undefined_resamples,
            "reason": self.reason,
        }


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's ρ of every row of ``x`` and ``y`` (``[B, n]``): Pearson's r of their average ranks (ties share
    the mean rank, as :func:`scipy.stats.spearmanr`); NaN for a row where either side is constant."""
    from scipy.stats import rankdata

    rank_x = rankdata(x, axis=-1)
    rank_y = rankdata(y, axis=-1)
    rank_x -= rank_x.mean(axis=-1, keepdims=True)
    rank_y -= rank_y.mean(axis=-1, keepdims=True)
    numerator = (rank_x * rank_y).sum(axis=-1)
    denominator = np.sqrt((rank_x**2).sum(axis=-1) * (rank_y**2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = numerator / denominator
    rho[denominator <= 1e-12 * np.maximum(1.0, np.abs(numerator))] = np.nan
    return np.clip(rho, -1.0, 1.0)


def pooled_spearman(
    clusters: Mapping[int, Sequence[tuple[Sequence[float], Sequence[float]]]],
    *,
    signal: str = "conflict",
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PooledCorrelation:
    """Spearman's ρ of ``(x, y)`` pairs pooled over seeds, with a two-stage cluster-bootstrap interval (METHOD §6).

    ``clusters[seed]`` lists that seed's runs, each as ``(x, y)`` (its pairs: the signal and the
    forgetting, :func:`cpt.report.statistics.forgetting_pairs`). The point estimate is
    :func:`cpt.report.statistics.spearman` of every pair pooled (the report's rule: fewer than
    ``MIN_PAIRS`` pairs or a constant input → undefined, with the reason).

    Each of the ``resamples`` resamples follows METHOD §6's cluster bootstrap with seeds as clusters:
    it draws the seeds with replacement, and within each drawn seed draws every run's pairs with
    replacement (as many as the run has; a seed drawn twice gets two independent draws; the runs of
    one seed — the variants pooled — stay together, since they share the seed's base evaluation and
    experts); ρ is recomputed on the pooled draw. The interval is the ``(1 ± confidence) / 2``
    percentiles of the defined ρ's. The pairs of one step share its signal value, so within a run
    they are not independent; the seed stage is what carries the run-to-run variation, and with a
    single seed the interval reflects the pairs' sampling only. Seeded, so a summary is
    reproducible.
    """
    from cpt.report.statistics import spearman

    _check_bootstrap_settings(resamples, confidence)
    seeds = sorted(clusters)
    runs = [[(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)) for x, y in clusters[s]] for s in seeds]
    for seed_runs in runs:
        for x, y in seed_runs:
            if x.shape != y.shape or x.ndim != 1:
                raise CptError(
                    f"statistics: {signal}: a run's signal and forgetting have {x.shape} and {y.shape} values"
                )
    all_x = np.concatenate([x for seed_runs in runs for x, _ in seed_runs] or [np.empty(0)])
    all_y = np.concatenate([y for seed_runs in runs for _, y in seed_runs] or [np.empty(0)])
    point = spearman(all_x.tolist(), all_y.tolist())
    per_seed = {}
    for s, seed_runs in zip(seeds, runs):
        seed_point = spearman(
            [v for x, _ in seed_runs for v in x.tolist()], [v for _, y in seed_runs for v in y.tolist()]
        )
        per_seed[s] = seed_point.rho
    used_seeds = [s for s, seed_runs in zip(seeds, runs) if any(len(x) for x, _ in seed_runs)]
    if point.rho is None:
        return PooledCorrelation(signal, point.n, used_seeds, None, None, None, per_seed, 0, point.reason)

    # Where each seed's pairs sit in the pooled arrays: seed k's p-th pair belongs to a run that starts at
    # start[k, p] and has span[k, p] pairs; a stage-2 draw for that slot is start + floor(u · span).
    S = len(seeds)
    counts = np.array([sum(len(x) for x, _ in seed_runs) for seed_runs in runs])
    width = max(int(counts.max()), 1)
    start = np.zeros((S, width), dtype=np.int64)
    span = np.ones((S, width), dtype=np.int64)
    offset = 0
    for k, seed_runs in enumerate(runs):
        position = 0
        for x, _ in seed_runs:
            start[k, position : position + len(x)] = offset
            span[k, position : position + len(x)] = len(x)
            position += len(x)
            offset += len(x)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, S, size=(resamples, S))  # stage 1: seeds with replacement
    draws = np.floor(rng.random((resamples, S, width)) * span[drawn]).astype(np.int64)  # stage 2: pairs in each run
    index = (start[drawn] + draws).reshape(resamples, -1)
    valid = (np.arange(width) < counts[drawn][..., None]).reshape(resamples, -1)  # slots past a seed's pairs: padding
    lengths = valid.sum(axis=-1)
    rhos = []
    for length in np.unique(lengths):  # resamples of one length are ranked together
        rows = lengths == length
        if length < 2:
            rhos.append(np.full(int(rows.sum()), np.nan))
            continue
        chosen = index[rows][valid[rows]].reshape(-1, int(length))
        rhos.append(spearman_rows(all_x[chosen], all_y[chosen]))
    values = np.concatenate(rhos)
    undefined = int(np.count_nonzero(~np.isfinite(values)))
    low, high = _interval(values, confidence)
    if not np.isfinite(low):
        low = high = None
    return PooledCorrelation(signal, point.n, used_seeds, point.rho, low, high, per_seed, undefined, None)
