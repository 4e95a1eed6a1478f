"""``evaluation.rows: needed``: only the accuracy-matrix entries METHOD §5's metrics read are scored.

The set (:func:`cpt.evaluation.needed_entries`) is checked against the metric code itself: every
metric of every prefix of a run is the same with the other entries blanked, and each needed
entry moves some metric of the finished run while no other entry does. On the tiny model, a
``needed`` run scores exactly the entries a ``rows: all`` run scores there (the others are null
and have no per-example file), resumes across a change of the setting, and reads back through
``cpt report``, ``cpt compare`` and the study statistics.
"""

import itertools
import json
import random

import numpy as np
import pytest
import yaml

from cpt.errors import CptError
from cpt.evaluation import continual_metrics, needed_entries
from cpt.recipe import validate_recipe
from cpt.study.statistics import RunOutcomes, bootstrap_study
from cpt.testing import build_tiny_model

from tiny_recipes import make_recipe, three_task_recipe

METRIC_KEYS = ("acc", "bwt", "fwt", "forgetting", "per_task_forgetting", "acc_all_tasks")


# ---------------------------------------------------------------------- the set, from METHOD §5
def test_needed_entries_hand_worked():
    assert needed_entries(1) == [[], [1]]
    assert needed_entries(2) == [[2], [1, 2], [1, 2]]
    # T = 4: the base row needs tasks 2..4 (FWT), rows 1–2 tasks 1..3 (forgetting's max, BWT's diagonal,
    # FWT's R[t][t+1]), row 3 every task (forgetting, FWT's R[3][4]), row 4 every task (ACC).
    assert needed_entries(4) == [[2, 3, 4], [1, 2, 3], [1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]]
    assert sum(4 - len(row) for row in needed_entries(4)) == 3


def blank_unneeded(matrix: list[list[float]]) -> list[list[float | None]]:
    needed = needed_entries(len(matrix[0]))
    return [[x if j in needed[i] else None for j, x in enumerate(row, start=1)] for i, row in enumerate(matrix)]


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 4, 6])
def test_every_metric_of_every_prefix_is_unchanged(num_tasks):
    rng = random.Random(num_tasks)
    for _ in range(20):
        full = [[rng.random() for _ in range(num_tasks)] for _ in range(num_tasks + 1)]
        blanked = blank_unneeded(full)
        for k in range(1, num_tasks + 1):  # a run in progress after k tasks, then the finished run
            expected = continual_metrics(full[: k + 1])
            got = continual_metrics(blanked[: k + 1])
            for key in ("acc", "bwt", "fwt", "forgetting"):
                assert got[key] == expected[key], (k, key)
            assert got["per_task_forgetting"] == expected["per_task_forgetting"]
        assert continual_metrics(blanked)["acc_all_tasks"] == continual_metrics(full)["acc_all_tasks"]


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 5])
def test_needed_entries_are_exactly_those_the_metrics_read(num_tasks):
    """An entry is needed iff changing it changes a metric of the finished run: raising it to 5 makes it
    the max of its column for forgetting, so a read entry always shows."""
    rng = random.Random(0)
    full = [[rng.random() for _ in range(num_tasks)] for _ in range(num_tasks + 1)]
    reference = continual_metrics(full)
    needed = needed_entries(num_tasks)
    for i, j in itertools.product(range(num_tasks + 1), range(1, num_tasks + 1)):
        changed = [list(row) for row in full]
        changed[i][j - 1] = 5.0
        metrics = continual_metrics(changed)
        moved = any(metrics[key] != reference[key] for key in METRIC_KEYS if key != "acc_all_tasks")
        assert moved == (j in needed[i]), (i, j)


# ---------------------------------------------------------------------- study statistics on blanked runs
def random_runs(num_tasks: int, drop_unneeded: bool, seeds=(0, 1)) -> list[RunOutcomes]:
    rng = np.random.default_rng(7)
    tasks = [f"t{j}" for j in range(1, num_tasks + 1)]
    needed = needed_entries(num_tasks)
    runs = []
    for variant in ("a", "b"):
        for seed in seeds:
            correct = {
                i: {task: rng.integers(0, 2, size=9 + j) for j, task in enumerate(tasks, start=1)}
                for i in range(1, num_tasks + 1)
            }
            if drop_unneeded:  # the same outcomes, without the entries no metric reads
                correct = {
                    i: {task: v for j, (task, v) in enumerate(row.items(), start=1) if j in needed[i]}
                    for i, row in correct.items()
                }
            runs.append(RunOutcomes.from_arrays(variant, seed, tasks, correct))
    return runs


def test_bootstrap_is_the_same_without_the_unneeded_entries():
    full = bootstrap_study(random_runs(4, drop_unneeded=False), resamples=300, seed=3).as_dict()
    blanked = bootstrap_study(random_runs(4, drop_unneeded=True), resamples=300, seed=3).as_dict()
    assert blanked == full and full["example_level"]


def test_bootstrap_still_refuses_a_missing_needed_entry():
    runs = random_runs(3, drop_unneeded=True)
    del runs[1].correct[2]["t3"]  # R[2][3] is FWT's entry (and forgetting's) for T = 3
    with pytest.raises(CptError, match=r"a/seed 1 row 2 task 't3' has 0 outcomes"):
        bootstrap_study(runs, resamples=10)


# ---------------------------------------------------------------------- the recipe option
def test_rows_is_outside_the_fingerprint(tmp_path):
    data = make_recipe(tmp_path, "unused-model")
    plain = validate_recipe(data)
    needed = validate_recipe({**data, "evaluation": {**data["evaluation"], "rows": "needed"}})
    assert plain.evaluation.rows == "all" and needed.evaluation.rows == "needed"
    assert needed.fingerprint() == plain.fingerprint(), "which entries are scored never changes a scored entry"
    with pytest.raises(CptError, match=r"evaluation.rows: Input should be 'all' or 'needed'"):
        validate_recipe({**data, "evaluation": {"rows": "some"}})


# ---------------------------------------------------------------------- runs on the tiny model
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def rows_recipe(tmp_path, model: str, name: str, rows: str) -> dict:
    """three_task_recipe (rows 1..T−2 have an entry to skip) without geometry, scoring ``rows``."""
    data = three_task_recipe(tmp_path, model, name=name)
    data["geometry"] = {"enabled": False}
    data["evaluation"]["rows"] = rows
    return data


def entries(run_dir) -> tuple[list, list[str]]:
    matrix = json.loads((run_dir / "eval" / "matrix.json").read_text())
    files = sorted(path.name for path in (run_dir / "eval").glob("[0-9]*_*.jsonl"))
    return matrix, files


@pytest.fixture(scope="module")
def all_and_needed(tiny_model, tmp_path_factory):
    """The same recipe run with rows: all and rows: needed (finished runs)."""
    from cpt.runner import TaskSequenceRunner

    tmp_path = tmp_path_factory.mktemp("rows")
    runs = {}
    for rows in ("all", "needed"):
        recipe = validate_recipe(rows_recipe(tmp_path, tiny_model, f"tiny-{rows}", rows))
        TaskSequenceRunner(recipe).run()
        runs[rows] = recipe.run_dir
    return runs


def test_needed_run_scores_exactly_the_needed_entries(all_and_needed):
    full, full_files = entries(all_and_needed["all"])
    needed, needed_files = entries(all_and_needed["needed"])
    tasks = full["tasks"]
    keep = needed_entries(len(tasks))
    assert sum(x is None for row in needed["rows"] for x in row) == 2  # base × plural, row 1 × reverse
    for i, (full_row, row) in enumerate(zip(full["rows"], needed["rows"])):
        for j, (expected, got) in enumerate(zip(full_row, row), start=1):
            assert got == (expected if j in keep[i] else None), (i, j)  # bit-identical where scored
    assert needed_files == sorted(f"{i}_{tasks[j - 1]}.jsonl" for i, row in enumerate(keep) for j in row)
    for name in needed_files:  # the same per-example outcomes as the full run's
        assert (all_and_needed["needed"] / "eval" / name).read_text() == (
            all_and_needed["all"] / "eval" / name
        ).read_text()
    assert set(full_files) - set(needed_files) == {"0_plural.jsonl", "1_reverse.jsonl"}
    assert needed["metrics"] == full["metrics"]
    manifest = json.loads((all_and_needed["needed"] / "manifest.json").read_text())
    assert manifest["evaluation_rows"] == "needed" and manifest["metrics"] == full["metrics"]
    assert "evaluation_rows" not in json.loads((all_and_needed["all"] / "manifest.json").read_text())


def test_report_compare_and_study_statistics_read_a_needed_run(all_and_needed, tmp_path):
    from cpt.report import write_report
    from cpt.report.comparison import compare_runs
    from cpt.study.summary import read_run_outcomes

    report = write_report(all_and_needed["needed"]).read_text()
    assert "`-` in the matrix: not evaluated" in report
    assert "after plural" in report and "ACC" in report

    table = compare_runs([all_and_needed["all"], all_and_needed["needed"]], tmp_path)
    lines = [line for line in table.splitlines() if line.startswith("| tiny-")]
    assert len(lines) == 2 and lines[0].split("|")[3:8] == lines[1].split("|")[3:8]  # same tasks done and metrics

    needed = read_run_outcomes(all_and_needed["needed"], "needed", 3)
    full = read_run_outcomes(all_and_needed["all"], "all", 3)
    assert needed.has_examples, "a skipped entry is no reason to fall back to the score matrix"
    assert "reverse" not in needed.correct[1] and set(full.correct[1]) == {"plural", "upper", "reverse"}
    stats = bootstrap_study([full, needed], resamples=200, seed=0).as_dict()
    assert stats["example_level"]
    assert stats["variants"]["needed"] == stats["variants"]["all"]
    pair = stats["pairs"][0]
    assert all(pair[m]["estimate"] == 0 and not pair[m]["distinguishable"] for m in ("acc", "bwt", "forgetting"))


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("all", "needed"), ("needed", "all")])
def test_resume_with_the_other_setting(all_and_needed, tiny_model, tmp_path, first, then, capsys):
    """Killed after task 1, resumed with the other value: the run continues (same fingerprint), every
    entry it scored equals the full run's, and every entry the metrics read is there."""
    from cpt.runner import TaskSequenceRunner

    data = rows_recipe(tmp_path, tiny_model, "tiny-mixed", first)
    runner = TaskSequenceRunner(validate_recipe(data))
    runner.setup()
    runner.run_task(1, runner.recipe.tasks[0], runner.task_data[0])  # then the process "dies"
    data["evaluation"]["rows"] = then
    TaskSequenceRunner(validate_recipe(data)).run()

    full, _ = entries(all_and_needed["all"])
    mixed, _ = entries(runner.rundir.root)
    rows_setting = [first, first, then, then]  # base and row 1 before the interruption
    keep = needed_entries(3)
    for i, (full_row, row) in enumerate(zip(full["rows"], mixed["rows"])):
        for j, (expected, got) in enumerate(zip(full_row, row), start=1):
            assert got == (expected if rows_setting[i] == "all" or j in keep[i] else None), (i, j)
    assert mixed["metrics"] == full["metrics"]
    manifest = json.loads((runner.rundir.root / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["evaluation_rows"] == "needed"
    if first == "needed":
        assert "their skipped entries stay null" in capsys.readouterr().err


def test_study_copies_a_base_row_only_when_it_has_every_entry_the_run_scores(tmp_path):
    from cpt.runner import TaskSequenceRunner
    from cpt.study.run import _share_base_row

    source = tmp_path / "source"
    (source / "eval").mkdir(parents=True)
    matrix = {"tasks": ["plural", "upper", "reverse"], "rows": [[None, 0.5, 0.25], None, None, None]}
    (source / "eval" / "matrix.json").write_text(json.dumps(matrix))
    for rows, shared in (("all", False), ("needed", True)):
        data = rows_recipe(tmp_path, "unused-model", f"target-{rows}", rows)
        runner = TaskSequenceRunner(validate_recipe(data))
        assert _share_base_row(runner, source) is shared
        assert (runner.rundir.root / "eval" / "matrix.json").exists() is shared


# ---------------------------------------------------------------------- the shipped study files
def test_shipped_study_files_load(monkeypatch):
    """Both shipped studies validate every variant's recipe (as `cpt study` does at load) without running."""
    from pathlib import Path

    from cpt.strategies import strategy_names
    from cpt.study.spec import load_study

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the base recipe's path is relative to the current folder
    assert [v.name for v in load_study("studies/quickstart.yaml").variants] == [
        "sequential",
        "gcwm",
        "task_arithmetic",
        "ties",
    ]
    study = load_study("studies/continual.yaml")
    by_name = {variant.name: variant for variant in study.variants}
    assert study.spec.seeds == [0, 1, 2] and len(study.variants) == 21
    # every registered strategy at its defaults, plus ties' fusionbench form (17 rows)
    defaults = {v.strategy for v in study.variants if not v.params}
    assert defaults == set(strategy_names())
    assert by_name["ties-fusionbench"].params == {"form": "fusionbench"}
    # the GCWM control rows of the geometry issue
    assert by_name["gcwm-step_coef-norm"].params == {"step_coef": "norm"}
    assert by_name["gcwm-gate-none"].params == {"gate": "none"}
    assert by_name["gcwm-metric-mean"].params == {"metric": "mean"}
    control = yaml.safe_load((root / "recipes" / "gcwm_control_ta.yaml").read_text())["strategy"]
    assert by_name["gcwm-control-ta"].strategy_section() == control
    recipe = study.recipe_for(by_name["gcwm"], 2)
    assert recipe.evaluation.rows == "needed" and not recipe.evaluation.evaluate_experts and recipe.seed == 2
    assert [task.name for task in recipe.tasks] == ["plural", "past_tense", "negation", "question"]
    assert all(task.max_examples == 192 and task.eval.max_examples == 150 for task in recipe.tasks)


def test_printed_matrix_and_tracker_metrics_leave_skipped_entries_out(all_and_needed):
    from cpt.evaluation import format_matrix_table
    from cpt.runner import TaskSequenceRunner, present_rows

    matrix, _ = entries(all_and_needed["needed"])
    table = format_matrix_table(present_rows(matrix), matrix["tasks"], matrix["expert_scores"], matrix["metrics"])
    base, after_plural = table.splitlines()[2:4]
    assert base.split()[:2] == ["base", "-"] and after_plural.split()[-1] == "-"

    recipe = validate_recipe(yaml.safe_load((all_and_needed["needed"] / "recipe.yaml").read_text()))
    runner = TaskSequenceRunner(recipe)
    runner.matrix = matrix
    logged = runner._matrix_row_metrics(1)  # what report_to trackers receive for row 1
    assert "eval_reverse" not in logged and logged["eval_plural"] == matrix["rows"][1][0]
    assert logged["eval_fwt"] == pytest.approx(continual_metrics(present_rows(matrix)[:2])["fwt"])
    assert "eval_plural" not in runner._matrix_row_metrics(0) and "eval_upper" in runner._matrix_row_metrics(0)


def test_study_summary_over_a_needed_run(all_and_needed, tmp_path):
    """A study folder holding the two tiny runs as two variants of one seed: summary.json/md are written and the
    variants' intervals are the same (the needed run has every entry the statistics read)."""
    import shutil

    from cpt.study.spec import load_study
    from cpt.study.summary import write_summary

    base = tmp_path / "base.yaml"
    base.write_text((all_and_needed["all"] / "recipe.yaml").read_text())
    study_file = tmp_path / "study.yaml"
    variants = ["sequential", {"strategy": "sequential", "name": "needed"}]
    study_file.write_text(
        yaml.safe_dump(
            {"recipe": str(base), "output_dir": str(tmp_path), "seeds": [3], "variants": variants, "statistics": {}}
        )
    )
    study = load_study(study_file)
    shutil.copytree(all_and_needed["all"], study.runs_dir / "sequential-seed3")
    shutil.copytree(all_and_needed["needed"], study.runs_dir / "needed-seed3")
    summary = write_summary(study)
    stats = summary["statistics"]
    assert stats["example_level"] and stats["variants"]["needed"] == stats["variants"]["sequential"]
    assert "| needed | sequential | - |" in (study.root / "summary.md").read_text()
