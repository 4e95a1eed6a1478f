"""Conflict vs forgetting pooled over a study's seeds (issue 19 item 4): ρ, its cluster-bootstrap interval, the summary."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import spearmanr

from cpt.report.loading import load_run
from cpt.report.statistics import forgetting_pairs
from cpt.study.spec import load_study
from cpt.study.statistics import pooled_spearman, spearman_rows
from cpt.study.summary import build_summary, format_summary, write_summary


def test_spearman_rows_matches_scipy_with_ties():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, size=(50, 12)).astype(float)  # many ties, as the pairs of one step share x
    y = rng.normal(size=(50, 12))
    y[:, :3] = y[:, :1]  # ties in y too
    expected = [spearmanr(a, b).statistic for a, b in zip(x, y)]
    assert spearman_rows(x, y) == pytest.approx(expected, abs=1e-12)
    constant = spearman_rows(np.ones((2, 5)), rng.normal(size=(2, 5)))
    assert np.isnan(constant).all()


def test_perfectly_monotone_and_reversed_pairs():
    # Three seeds, one run each: drop = x + seed offset, tied within steps as the report's pairs are.
    x = {seed: [0.1, 0.2, 0.2, 0.3, 0.3, 0.3] for seed in range(3)}
    clusters = {seed: [(np.add(x[seed], seed), np.add(x[seed], seed) * 2)] for seed in range(3)}
    up = pooled_spearman(clusters, resamples=300, seed=0)
    assert (up.rho, up.low, up.high, up.n, up.seeds) == (
        pytest.approx(1.0),
        pytest.approx(1.0),
        pytest.approx(1.0),
        18,
        [0, 1, 2],
    )
    assert up.per_seed == {0: pytest.approx(1.0), 1: pytest.approx(1.0), 2: pytest.approx(1.0)}
    down = pooled_spearman({s: [(a, -b)] for s, [(a, b)] in clusters.items()}, resamples=300, seed=0)
    assert down.rho == pytest.approx(-1.0) and down.high == pytest.approx(-1.0)


def test_interval_contains_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(0)
    clusters = {}
    for seed in range(4):
        x = rng.normal(size=10)
        clusters[seed] = [(x, 0.5 * x + rng.normal(size=10)), (x[:6], rng.normal(size=6))]  # two variants per seed
    result = pooled_spearman(clusters, resamples=500, seed=7)
    pooled_x = np.concatenate([x for runs in clusters.values() for x, _ in runs])
    pooled_y = np.concatenate([y for runs in clusters.values() for _, y in runs])
    assert result.rho == pytest.approx(spearmanr(pooled_x, pooled_y).statistic)
    assert result.n == 64 and -1 <= result.low < result.rho < result.high <= 1
    assert pooled_spearman(clusters, resamples=500, seed=7) == result
    assert pooled_spearman(clusters, resamples=500, seed=8) != result


def test_too_few_pairs_and_constant_signal_say_why():
    few = pooled_spearman({0: [([0.1], [0.2])], 1: [([0.3], [0.1])]})
    assert few.rho is None and few.low is None and few.n == 2 and few.reason.startswith("not enough points: 3")
    constant = pooled_spearman({0: [([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])]})
    assert constant.rho is None and "the signal is constant" in constant.reason


def test_coverage_on_synthetic_data():
    """Bivariate normal pairs with correlation r have Spearman ρ_s = (6/π)·asin(r/2): 90 % intervals cover it
    in about 90 % of synthetic studies (seeds and pairs iid, so the cluster bootstrap is a plain one here)."""
    r = 0.5
    truth = 6 / math.pi * math.asin(r / 2)
    rng = np.random.default_rng(11)
    covered, studies = 0, 120
    for study in range(studies):
        clusters = {}
        for seed in range(8):
            sample = rng.multivariate_normal([0, 0], [[1, r], [r, 1]], size=15)
            clusters[seed] = [(sample[:, 0], sample[:, 1])]
        result = pooled_spearman(clusters, resamples=400, confidence=0.9, seed=study)
        covered += result.low <= truth <= result.high
    assert 0.8 <= covered / studies <= 0.98, covered


# ---------------------------------------------------------------------- from run directories
def fake_geometry_run(root: Path, name: str, tasks: list[str], drops: list[float], signals: dict[str, list[float]]):
    """A finished run directory in the format `cpt report` reads: the score matrix and geometry/<t>_<task>.json.

    Step t (2..T) lowers every earlier task's score by ``drops[t-2]``; its geometry file holds the signals'
    means (``signals[name][t-2]``) as the geometry callback aggregates them.
    """
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "geometry").mkdir()
    T = len(tasks)
    rows = [[0.5] * T]
    for t in range(1, T + 1):
        row = list(rows[-1])
        if t >= 2:
            row[: t - 1] = [score - drops[t - 2] for score in row[: t - 1]]
        row[t - 1] = 0.9
        rows.append(row)
    (run / "eval" / "matrix.json").write_text(json.dumps({"tasks": tasks, "rows": rows, "expert_scores": [None] * T}))
    manifest = {"status": "complete", "tasks": [{"name": task, "status": "done"} for task in tasks]}
    (run / "manifest.json").write_text(json.dumps(manifest))
    for t in range(2, T + 1):
        aggregates = {
            "geometry_conflict": {"mean": signals["conflict"][t - 2]},
            "norm_update": {"mean": signals["norm"][t - 2]},
        }
        if "sar" in signals:
            aggregates["sar_update_to_state"] = {"mean": signals["sar"][t - 2]}
        report = {"step": t, "task": tasks[t - 1], "aggregates": aggregates, "per_tensor": {}}
        (run / "geometry" / f"{t}_{tasks[t - 1]}.json").write_text(json.dumps(report))
    return run


def write_study(tmp_path: Path, variants, seeds) -> Path:
    from tiny_recipes import make_recipe

    recipe_path = tmp_path / "base.yaml"
    recipe_path.write_text(yaml.safe_dump(make_recipe(tmp_path, "unused-model")))
    path = tmp_path / "study.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "recipe": str(recipe_path),
                "name": "s",
                "output_dir": str(tmp_path / "studies"),
                "seeds": seeds,
                "variants": variants,
                "statistics": {"resamples": 300},
            }
        )
    )
    return path


def test_summary_pools_the_reports_pairs_over_seeds(tmp_path):
    study = load_study(write_study(tmp_path, ["sequential", "task_arithmetic", "average"], [0, 1, 2]))
    tasks = ["a", "b", "c", "d"]  # fake runs: the correlations read the run directories only
    for seed in (0, 1, 2):
        drops = [0.01 * (seed + 1), 0.02 * (seed + 1), 0.03 * (seed + 1)]
        # sequential: conflict rises with the drop (ρ = +1), ‖Δ‖ falls with it (ρ = −1), SAR is unrelated.
        fake_geometry_run(
            study.runs_dir,
            f"sequential-seed{seed}",
            tasks,
            drops,
            {
                "conflict": [d * 10 for d in drops],
                "norm": [-d for d in drops],
                "sar": [0.2, 0.1, 0.3] if seed == 1 else [0.3, 0.1, 0.2],
            },
        )
        # task_arithmetic: the same signals, without SAR (geometry files from before SAR was aggregated).
        fake_geometry_run(
            study.runs_dir,
            f"task_arithmetic-seed{seed}",
            tasks,
            drops,
            {"conflict": [d * 10 + 0.5 for d in drops], "norm": [1.0, 1.0, 1.0]},
        )
    # average: no geometry at all (left out of the table and of the pooled row).
    for seed in (0, 1, 2):
        run = study.runs_dir / f"average-seed{seed}"
        (run / "eval").mkdir(parents=True)
        (run / "manifest.json").write_text(json.dumps({"status": "complete", "tasks": [{"name": t} for t in tasks]}))
        (run / "eval" / "matrix.json").write_text(
            json.dumps({"tasks": tasks, "rows": [[0.5] * 4] * 5, "expert_scores": [None] * 4})
        )

    # The pairs are the report's: 1 + 2 + 3 = 6 per run of four tasks, each with its step's drop.
    data = load_run(study.runs_dir / "sequential-seed1")
    pairs = forgetting_pairs(data.rows, data.geometry)
    assert len(pairs) == 6 and [p.drop for p in pairs] == pytest.approx([0.02, 0.04, 0.04, 0.06, 0.06, 0.06])
    assert pairs[0].sar == 0.2 and pairs[-1].sar == 0.3  # seed 1 lists SAR reversed: steps 2..4 → 0.2, 0.1, 0.3

    summary = build_summary(study)
    found = summary["conflict_vs_forgetting"]
    assert set(found["variants"]) == {"sequential", "task_arithmetic"} and found["pooled_variants"] == [
        "sequential",
        "task_arithmetic",
    ]
    sequential = found["variants"]["sequential"]
    assert sequential["conflict"]["rho"] == pytest.approx(1.0) and sequential["conflict"]["n"] == 18
    assert sequential["conflict"]["low"] == pytest.approx(1.0) and sequential["conflict"]["seeds"] == [0, 1, 2]
    assert sequential["norm"]["rho"] == pytest.approx(-1.0)
    x = [p.sar for s in (0, 1, 2) for p in forgetting_pairs(*_rows_geometry(study, "sequential", s))]
    y = [p.drop for s in (0, 1, 2) for p in forgetting_pairs(*_rows_geometry(study, "sequential", s))]
    assert sequential["sar"]["rho"] == pytest.approx(spearmanr(x, y).statistic)
    assert sequential["sar"]["low"] <= sequential["sar"]["rho"] <= sequential["sar"]["high"]
    ta = found["variants"]["task_arithmetic"]
    assert "sar" not in ta and ta["norm"]["rho"] is None and "the signal is constant" in ta["norm"]["reason"]
    pooled = found["pooled"]
    assert pooled["conflict"]["n"] == 36 and pooled["conflict"]["rho"] < 1.0  # task_arithmetic's offset breaks ties

    text = format_summary(summary)
    assert "| sequential | 3 | 18 | +1.000 [+1.000, +1.000] | -1.000 [-1.000, -1.000] |" in text
    assert (
        "| task_arithmetic | 3 | 18 | +1.000 [+1.000, +1.000] | undefined: the signal is constant across the pairs | - |"
        in text
    )
    assert "| all 2 variants | 3 | 36 |" in text
    written = write_summary(study)
    assert (
        json.loads((study.root / "summary.json").read_text())["conflict_vs_forgetting"]
        == written["conflict_vs_forgetting"]
    )


def _rows_geometry(study, variant: str, seed: int):
    data = load_run(study.runs_dir / f"{variant}-seed{seed}")
    return data.rows, data.geometry


def test_summary_without_geometry_has_no_correlation_table(tmp_path):
    study = load_study(write_study(tmp_path, ["sequential"], [0]))
    run = study.runs_dir / "sequential-seed0"
    (run / "eval").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"status": "complete", "tasks": [{"name": "a"}]}))
    (run / "eval" / "matrix.json").write_text(json.dumps({"tasks": ["a"], "rows": [[0.1], [0.9]]}))
    summary = build_summary(study)
    assert "conflict_vs_forgetting" not in summary and "Conflict vs forgetting" not in format_summary(summary)
