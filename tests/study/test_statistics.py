"""The paired cluster bootstrap of METHOD §6 (cpt.study.statistics)."""

import numpy as np
import pytest
from scipy import stats

from cpt.errors import CptError
from cpt.study.statistics import RunOutcomes, bootstrap_study, metrics_from_matrices


def run(variant, seed, tasks, rows):
    """rows: {row: {task: outcomes}}"""
    return RunOutcomes.from_arrays(variant, seed, tasks, rows)


def test_metrics_hand_worked():
    # T = 2: ACC = (0.6 + 0.9)/2; BWT = 0.6 − 0.8; forgetting = max_{i<2} R[i][1] − R[2][1] = 0.8 − 0.6.
    metrics = metrics_from_matrices(np.array([[0.8, 0.1], [0.6, 0.9]]))
    assert metrics["acc"] == pytest.approx(0.75)
    assert metrics["bwt"] == pytest.approx(-0.2)
    assert metrics["forgetting"] == pytest.approx(0.2)
    # T = 3: forgetting of task 1 uses its best row (row 2 = 0.9), not its diagonal (0.7).
    R = np.array([[0.7, 0.2, 0.1], [0.9, 0.8, 0.3], [0.5, 0.6, 0.9]])
    metrics = metrics_from_matrices(R)
    assert metrics["acc"] == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert metrics["bwt"] == pytest.approx(((0.5 - 0.7) + (0.6 - 0.8)) / 2)
    assert metrics["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.6)) / 2)
    # vectorised over leading axes
    stacked = metrics_from_matrices(np.stack([R, R]))
    assert stacked["acc"].shape == (2,) and stacked["acc"][1] == pytest.approx(metrics["acc"])


def test_matches_cpt_evaluation_metrics():
    from cpt.evaluation import continual_metrics

    rng = np.random.default_rng(0)
    R = rng.random((4, 4))
    ours = metrics_from_matrices(R)
    theirs = continual_metrics([[0.5] * 4, *R.tolist()])  # row 0 (base) does not enter ACC/BWT/F
    for name in ("acc", "bwt", "forgetting"):
        assert ours[name] == pytest.approx(theirs[name])


def test_constant_outcomes_give_degenerate_intervals():
    tasks = ["a", "b"]
    ones, zeros = [1] * 5, [0] * 5
    runs = [run("always", s, tasks, {1: {"a": ones, "b": zeros}, 2: {"a": ones, "b": ones}}) for s in (0, 1)]
    runs += [run("never", s, tasks, {1: {"a": zeros, "b": zeros}, 2: {"a": zeros, "b": zeros}}) for s in (0, 1)]
    result = bootstrap_study(runs, resamples=200, seed=1)
    acc = result.variants["always"]["acc"]
    assert (acc.estimate, acc.low, acc.high) == (1.0, 1.0, 1.0)
    diff = result.pairs[("always", "never")]["acc"]
    assert (diff.estimate, diff.low, diff.high, diff.distinguishable) == (1.0, 1.0, 1.0, True)
    assert result.variants["always"]["bwt"].estimate == 0.0 and result.variants["always"]["forgetting"].estimate == 0.0


def test_seed_level_resampling_hand_worked():
    # One task, seed 0 always right, seed 1 always wrong: a resample's ACC is the share of seed-0 draws
    # among two, so it is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4 → the 95 % interval is [0, 1].
    runs = [run("v", 0, ["a"], {1: {"a": [1, 1, 1]}}), run("v", 1, ["a"], {1: {"a": [0, 0, 0]}})]
    runs += [run("w", 0, ["a"], {1: {"a": [1, 1, 1]}}), run("w", 1, ["a"], {1: {"a": [0, 0, 0]}})]
    result = bootstrap_study(runs, resamples=4000, seed=0)
    acc = result.variants["v"]["acc"]
    assert (acc.estimate, acc.low, acc.high) == (0.5, 0.0, 1.0)
    # Identical variants: every paired resample differs by exactly 0, so they are not distinguishable.
    diff = result.pairs[("v", "w")]["acc"]
    assert (diff.low, diff.high, diff.distinguishable) == (0.0, 0.0, False)


def test_single_level_case_matches_scipy_bootstrap():
    # One seed, one task: the cluster bootstrap reduces to the plain bootstrap of a mean.
    rng = np.random.default_rng(3)
    outcomes = (rng.random(120) < 0.7).astype(float)
    ours = bootstrap_study([run("v", 0, ["a"], {1: {"a": outcomes}})], resamples=20000, seed=5).variants["v"]["acc"]
    reference = stats.bootstrap((outcomes,), np.mean, method="percentile", n_resamples=20000, random_state=7)
    assert ours.estimate == pytest.approx(outcomes.mean())
    assert ours.low == pytest.approx(reference.confidence_interval.low, abs=0.01)
    assert ours.high == pytest.approx(reference.confidence_interval.high, abs=0.01)


def test_pairing_resolves_small_but_consistent_differences():
    # B is A with 6 more right answers out of 200 per seed: unpaired intervals overlap,
    # but every resample of the paired difference is ≥ 0 → distinguishable.
    rng = np.random.default_rng(0)
    runs = []
    for seed in range(3):
        a = (rng.random(200) < 0.6).astype(float)
        b = a.copy()
        b[np.flatnonzero(a == 0)[:6]] = 1
        runs += [run("A", seed, ["t"], {1: {"t": a}}), run("B", seed, ["t"], {1: {"t": b}})]
    result = bootstrap_study(runs, resamples=2000, seed=0)
    ia, ib = result.variants["A"]["acc"], result.variants["B"]["acc"]
    assert ia.high > ib.low, "the marginal intervals overlap"
    diff = result.pairs[("A", "B")]["acc"]
    assert diff.estimate == pytest.approx(-0.03)
    assert diff.high < 0 and diff.distinguishable


def test_interval_covers_true_difference_at_nominal_rate():
    # Synthetic studies with a known ACC difference: per seed a fresh eval set of 60 examples
    # per task with shared difficulties u (so A and B are paired); A right when u < p_A, B when u < p_B.
    rng = np.random.default_rng(2024)
    p_final = {"A": np.array([0.70, 0.55]), "B": np.array([0.62, 0.58])}
    p_first = {"A": 0.8, "B": 0.75}
    true_diff = p_final["A"].mean() - p_final["B"].mean()
    covered = 0
    simulations = 200
    for sim in range(simulations):
        runs = []
        for seed in range(3):
            shift = rng.normal(0, 0.03)  # a seed effect shared by both variants
            u = {task: rng.random(60) for task in ("x", "y")}
            for v in ("A", "B"):
                rows = {
                    1: {"x": (u["x"] < p_first[v] + shift).astype(float), "y": (u["y"] < 0.3).astype(float)},
                    2: {
                        "x": (u["x"] < p_final[v][0] + shift).astype(float),
                        "y": (u["y"] < p_final[v][1] + shift).astype(float),
                    },
                }
                runs.append(run(v, seed, ["x", "y"], rows))
        diff = bootstrap_study(runs, resamples=400, seed=sim).pairs[("A", "B")]["acc"]
        covered += diff.low <= true_diff <= diff.high
    assert 0.90 <= covered / simulations <= 0.99, covered / simulations


def test_score_only_runs_resample_seeds():
    runs = []
    for seed, (a, b) in enumerate([(0.8, 0.7), (0.9, 0.7), (0.85, 0.75)]):
        for variant, score in (("A", a), ("B", b)):
            runs.append(RunOutcomes(variant, seed, ["t"], scores={1: {"t": score}}))
    result = bootstrap_study(runs, resamples=1000, seed=0)
    assert not result.example_level
    diff = result.pairs[("A", "B")]["acc"]
    assert diff.estimate == pytest.approx((0.1 + 0.2 + 0.1) / 3)
    assert 0.1 - 1e-12 <= diff.low and diff.high <= 0.2 + 1e-12 and diff.distinguishable


def test_errors_are_one_line():
    runs = [run("A", 0, ["t"], {1: {"t": [1, 0]}}), run("B", 0, ["t"], {1: {"t": [1, 0, 1]}})]
    with pytest.raises(CptError, match="expected 2 .*same eval set"):
        bootstrap_study(runs)
    with pytest.raises(CptError, match="missing B/seed 1"):
        bootstrap_study(
            [
                run("A", 0, ["t"], {1: {"t": [1]}}),
                run("A", 1, ["t"], {1: {"t": [1]}}),
                run("B", 0, ["t"], {1: {"t": [1]}}),
            ]
        )


def test_reproducible_and_fast():
    import time

    rng = np.random.default_rng(0)
    tasks = ["a", "b", "c", "d"]
    runs = [
        run(v, s, tasks, {i: {t: (rng.random(150) < 0.7) for t in tasks} for i in range(1, 5)})
        for v in ("v1", "v2", "v3", "v4", "v5", "v6")
        for s in range(3)
    ]
    started = time.perf_counter()
    first = bootstrap_study(runs, resamples=2000, seed=11)
    assert time.perf_counter() - started < 20
    second = bootstrap_study(runs, resamples=2000, seed=11)
    assert first.as_dict() == second.as_dict()
    assert len(first.pairs) == 15
