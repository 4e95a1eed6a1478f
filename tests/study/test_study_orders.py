"""Task-order variants of `cpt study` (METHOD §7's ordering study): validation, names, recipes, planning once per seed."""

import itertools
import json

import numpy as np
import pytest
import yaml

from cpt.errors import CptError
from cpt.study.run import _share_base_row, plan_seed
from cpt.study.spec import load_study, random_order
from cpt.study.statistics import RunOutcomes, bootstrap_study
from cpt.study.summary import build_summary, format_summary
from cpt.testing import build_tiny_model

from tiny_recipes import count_trainings, make_recipe, three_task_recipe
from tiny_recipes import write_study as write_study_files


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def write_study(tmp_path, variants, *, model="unused-model", recipe=None, seeds=(0, 1)):
    recipe = recipe or three_task_recipe(tmp_path, model)
    return write_study_files(tmp_path, recipe, variants, name="orders", seeds=seeds, resamples=200)


def fake_plan(study, seed: int, planned: list[str]) -> None:
    """What plan_seed records, without training (the orders' plumbing is under test here)."""
    study.plans[seed] = {"seed": seed, "given": study.task_names, "planned": planned, "cost": 0.1, "given_cost": 0.2}


def test_order_names_and_recipes(tmp_path):
    path = write_study(
        tmp_path,
        [
            "sequential",
            {"strategy": "sequential", "orders": ["planned", "reverse_planned", "random:1", "random:4"]},
            {"strategy": "task_arithmetic", "order": ["reverse", "plural", "upper"]},  # one order, not a grid
            {"strategy": "ties", "density": [0.2, 0.5], "order": "planned"},
        ],
    )
    study = load_study(path)
    assert [v.name for v in study.variants] == [
        "sequential",
        "sequential-order_planned",
        "sequential-order_reverse_planned",
        "sequential-order_random_1",
        "sequential-order_random_4",
        "task_arithmetic-order_reverse.plural.upper",
        "ties-density0.2-order_planned",
        "ties-density0.5-order_planned",
    ]
    by_name = {v.name: v for v in study.variants}
    assert by_name["ties-density0.5-order_planned"].params == {"density": 0.5}
    assert study.task_names == ["plural", "upper", "reverse"]

    given = study.recipe_for(by_name["sequential"], 0)
    assert [t.name for t in given.tasks] == ["plural", "upper", "reverse"]
    explicit = study.recipe_for(by_name["task_arithmetic-order_reverse.plural.upper"], 1)
    assert [t.name for t in explicit.tasks] == ["reverse", "plural", "upper"]
    # The reordered recipe keeps each task's own settings (upper's eval kind travels with it).
    assert explicit.tasks[2].eval.kind == "choice" and explicit.tasks[0].eval.kind != "choice"

    # random:<k>: the tasks sorted by sha256("<k>:<name>"), the same for every seed, a permutation.
    import hashlib

    for k in (1, 4):
        expected = sorted(study.task_names, key=lambda n: hashlib.sha256(f"{k}:{n}".encode()).hexdigest())
        variant = by_name[f"sequential-order_random_{k}"]
        assert study.task_order(variant, 0) == study.task_order(variant, 1) == expected
    assert random_order(["b", "a", "c"], 7) == random_order(["c", "b", "a"], 7)  # independent of the listing

    # Planned orders are known once the seed is planned; before, a one-line error.
    with pytest.raises(CptError, match=r"planned order of seed 0 is not known yet"):
        study.recipe_for(by_name["sequential-order_planned"], 0)
    fake_plan(study, 0, ["upper", "reverse", "plural"])
    fake_plan(study, 1, ["reverse", "plural", "upper"])
    assert [t.name for t in study.recipe_for(by_name["sequential-order_planned"], 0).tasks] == [
        "upper",
        "reverse",
        "plural",
    ]
    assert study.task_order(by_name["sequential-order_reverse_planned"], 1) == ["upper", "plural", "reverse"]
    assert study.recipe_for(by_name["sequential-order_planned"], 1).name == "sequential-order_planned-seed1"

    summary = build_summary(study)
    assert summary["task_orders"]["sequential-order_reverse_planned"] == {
        "0": ["plural", "reverse", "upper"],
        "1": ["upper", "plural", "reverse"],
    }
    assert "sequential" not in summary["task_orders"]
    assert {"name": "sequential", "strategy": "sequential", "params": {}} in summary["variants"]
    assert summary["plans"]["0"]["planned"] == ["upper", "reverse", "plural"]
    # random:1 is seed 0's planned order, random:4 seed 1's: the summary says which runs share an order.
    assert summary["same_orders"] == {
        "0": [["sequential-order_planned", "sequential-order_random_1"]],
        "1": [["sequential-order_planned", "sequential-order_random_4"]],
    }
    text = format_summary(summary)
    assert "| 0 | upper → reverse → plural | 0.1000 | 0.2000 |" in text
    assert "| sequential-order_planned | upper → reverse → plural | reverse → plural → upper |" in text
    assert "Seed 0: sequential-order_planned, sequential-order_random_1 train the tasks in the same order" in text


@pytest.mark.parametrize(
    "variant, message",
    [
        (
            {"strategy": "sequential", "order": "planed"},
            r"order: 'planed' is not a task order \(did you mean 'planned'\?\)",
        ),
        ({"strategy": "sequential", "order": "random:x"}, r"'random:x' is not a task order"),
        (
            {"strategy": "sequential", "order": ["plurl", "upper", "reverse"]},
            r"order: 'plurl' is not a task of the recipe \(did you mean 'plural'\?\); its tasks: plural, upper, reverse",
        ),
        ({"strategy": "sequential", "order": ["plural", "upper"]}, r"order \['plural', 'upper'\] leaves out reverse"),
        (
            {"strategy": "sequential", "order": ["plural", "upper", "upper", "reverse"]},
            r"repeats upper; list every task of the recipe once",
        ),
        ({"strategy": "sequential", "order": 3}, r"3 is not a task order"),
        ({"strategy": "sequential", "order": "planned", "orders": ["given"]}, r"either order .* or orders"),
        ({"strategy": "sequential", "orders": []}, r"orders: give a non-empty list"),
        ({"strategy": "sequential", "orders": ["planned", "planned"]}, r"an order is listed twice"),
        ({"strategy": "sequential", "orders": ["given", ["upper", "plural"]]}, r"leaves out reverse"),
        # sha256 happens to sort these three tasks alike for k = 1 and 2: the same runs twice, refused.
        (
            {"strategy": "sequential", "orders": ["random:1", "random:2"]},
            r"sequential-order_random_1, sequential-order_random_2 train the tasks in the same order "
            r"\(upper → reverse → plural\); give one of them another random:<k> or order",
        ),
    ],
)
def test_bad_orders_are_one_line_errors(tmp_path, variant, message):
    path = write_study(tmp_path, [variant])
    with pytest.raises(CptError, match=message) as info:
        load_study(path)
    assert "\n" not in str(info.value) and "variants: sequential" in str(info.value)


def test_given_order_names_and_recipes_are_unchanged(tmp_path):
    """A study without orders expands exactly as before (no suffix, the recipe's order)."""
    path = write_study(tmp_path, ["sequential", {"strategy": "sequential", "name": "seq2", "order": "given"}])
    study = load_study(path)
    assert [v.name for v in study.variants] == ["sequential", "seq2"]
    assert all(v.order == "given" and not v.needs_plan for v in study.variants) and not study.needs_plans
    assert "task_orders" not in build_summary(study)


def outcomes(variant: str, seed: int, order: list[str], final: dict[str, list[int]], learned: dict[str, list[int]]):
    """A run training ``order``; each task is ``learned`` right after its own step, ``final`` at the end,
    and 0 before it is trained."""
    T = len(order)
    correct = {}
    for row in range(1, T + 1):
        correct[row] = {}
        for position, task in enumerate(order, start=1):
            n = len(final[task])
            if row == T:
                correct[row][task] = final[task]
            elif row >= position:
                correct[row][task] = learned[task]
            else:
                correct[row][task] = [0] * n
    ids = {task: [f"{task}{k}" for k in range(len(final[task]))] for task in order}
    return RunOutcomes.from_arrays(variant, seed, order, correct, ids)


def test_bootstrap_pairs_examples_by_task_name_not_position():
    rng = np.random.default_rng(0)
    final = {task: rng.integers(0, 2, 40).tolist() for task in ("a", "b", "c")}
    learned = {task: [1] * 40 for task in ("a", "b", "c")}
    runs = []
    for seed in (0, 1, 2):
        runs.append(outcomes("given", seed, ["a", "b", "c"], final, learned))
        runs.append(outcomes("reversed", seed, ["c", "b", "a"], final, learned))
    stats = bootstrap_study(runs, resamples=300, seed=1)
    # The same final outcomes per task *name*: ACC is the same in every resample (up to the order of the sum) …
    difference = stats.pairs[("given", "reversed")]["acc"]
    assert [difference.estimate, difference.low, difference.high] == pytest.approx([0, 0, 0], abs=1e-12)
    assert stats.variants["given"]["acc"].high > stats.variants["given"]["acc"].low  # … while ACC itself varies.
    # Forgetting is computed in each run's own training order: the last task trained (c, resp. a) is left out.
    for variant, first_two in (("given", ("a", "b")), ("reversed", ("c", "b"))):
        expected = np.mean([1 - np.mean(final[task]) for task in first_two])
        interval = stats.variants[variant]["forgetting"]
        assert interval.estimate == pytest.approx(expected)
        assert interval.low <= interval.estimate <= interval.high
    # Position pairing would be wrong here: a run trained in another order is not refused, and the same
    # variant alone gives the same point estimates.
    alone = bootstrap_study([run for run in runs if run.variant == "reversed"], resamples=300, seed=1)
    assert alone.variants["reversed"]["bwt"].estimate == pytest.approx(stats.variants["reversed"]["bwt"].estimate)


def test_bootstrap_refuses_runs_of_another_task_set():
    runs = [
        RunOutcomes.from_arrays("x", 0, ["a", "b"], {1: {"a": [1], "b": [0]}, 2: {"a": [1], "b": [1]}}),
        RunOutcomes.from_arrays("y", 0, ["a", "c"], {1: {"a": [1], "c": [0]}, 2: {"a": [1], "c": [1]}}),
    ]
    with pytest.raises(CptError, match=r"expected the tasks \['a', 'b'\] \(in any order\)"):
        bootstrap_study(runs, resamples=10)


def test_shared_base_row_follows_the_target_order(tmp_path):
    from cpt.recipe import validate_recipe
    from cpt.runner import TaskSequenceRunner

    source = tmp_path / "source"
    (source / "eval").mkdir(parents=True)
    matrix = {"tasks": ["plural", "upper", "reverse"], "rows": [[0.1, 0.2, 0.3], None, None, None]}
    (source / "eval" / "matrix.json").write_text(json.dumps(matrix))
    (source / "eval" / "0_upper.jsonl").write_text('{"id": "u0", "correct": true}\n')
    recipe = three_task_recipe(tmp_path, "unused-model")
    recipe["tasks"] = [recipe["tasks"][2], recipe["tasks"][0], recipe["tasks"][1]]
    recipe["output_dir"] = str(tmp_path / "runs")
    runner = TaskSequenceRunner(validate_recipe(recipe))
    assert _share_base_row(runner, source)
    shared = json.loads((runner.rundir.matrix_path).read_text())
    assert shared["tasks"] == ["reverse", "plural", "upper"] and shared["rows"][0] == [0.3, 0.1, 0.2]
    assert (runner.rundir.root / "eval" / "0_upper.jsonl").exists()


@pytest.mark.slow
def test_planned_variant_runs_in_the_plans_order_and_planning_reuses_cached_experts(tmp_path, tiny_model, monkeypatch):
    from cpt.study.expert_cache import ExpertCache
    from cpt.study.run import run_study

    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path / "cache"))
    recipe = make_recipe(tmp_path, tiny_model, steps=(2, 2))
    path = write_study(
        tmp_path, ["task_arithmetic", {"strategy": "sequential", "order": "reverse_planned"}], recipe=recipe, seeds=[0]
    )
    study = load_study(path)
    trainings = count_trainings(monkeypatch)
    summary = run_study(study)

    plan = json.loads(study.plan_path(0).read_text())
    assert sorted(plan["planned"]) == ["plural", "upper"] and plan["reverse_planned"] == plan["planned"][::-1]
    assert plan["experts_from_cache"] == [False, False] and plan["method"] == "exact"
    # Planning trained the two θ0 experts; the given-order θ0 variant reused both; sequential trained its two.
    assert len(trainings) == 4
    manifest = json.loads((study.runs_dir / "task_arithmetic-seed0" / "manifest.json").read_text())
    assert [t["expert_cache"]["hit"] for t in manifest["tasks"]] == [True, True]
    # The reordered run trains the tasks in the plan's (reversed) order, and its matrix says so.
    run = study.runs_dir / "sequential-order_reverse_planned-seed0"
    manifest = json.loads((run / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == plan["reverse_planned"]
    matrix = json.loads((run / "eval" / "matrix.json").read_text())
    assert matrix["tasks"] == plan["reverse_planned"]
    assert summary["plans"]["0"]["planned"] == plan["planned"] and "conflicts" not in summary["plans"]["0"]
    # Every measured step conflict is kept (T·2^(T−1) − T = 2 for T = 2): C of every variant's order follows.
    assert len(plan["conflicts"]) == 2 and summary["predicted_conflict"] == {
        "task_arithmetic": {"0": pytest.approx(plan["given_cost"])},
        "sequential-order_reverse_planned": {"0": pytest.approx(plan["cost"], rel=1e-6)},  # GC is symmetric
    }
    assert summary["task_orders"]["sequential-order_reverse_planned"] == {"0": plan["reverse_planned"]}
    assert "over 1 seed (2 experts trained for it)." in (study.root / "summary.md").read_text()
    assert set(summary["statistics"]["variants"]) == {"task_arithmetic", "sequential-order_reverse_planned"}
    # Real geometry files: the report's pairs carry SAR too; one pair a run (two tasks) is too few for ρ.
    from cpt.report.loading import load_run
    from cpt.report.statistics import forgetting_pairs

    data = load_run(run)
    [pair] = forgetting_pairs(data.rows, data.geometry)
    assert pair.conflict is not None and pair.norm > 0 and 0 <= pair.sar <= 1
    found = summary["conflict_vs_forgetting"]
    assert found["pooled"]["conflict"]["n"] == 2 and found["pooled"]["sar"]["reason"].startswith("not enough points")

    # Planning again (the plan file gone) takes every expert from the cache: the trainer is not called.
    study.plan_path(0).unlink()
    again = plan_seed(load_study(path), 0, ExpertCache())
    assert len(trainings) == 4 and again["experts_from_cache"] == [True, True]
    assert again["planned"] == plan["planned"] and again["cost"] == pytest.approx(plan["cost"])
    # Starting the finished study again reads the plan file and runs nothing.
    run_study(load_study(path))
    assert len(trainings) == 4


def test_shipped_ordering_study():
    """studies/ordering.yaml: sequential and task_arithmetic in four orders each, 3 seeds (METHOD §7)."""
    from pathlib import Path

    from cpt.study.spec import StudySpec, expand_variants

    root = Path(__file__).resolve().parents[2]
    path = root / "studies" / "ordering.yaml"
    spec = StudySpec.model_validate(yaml.safe_load(path.read_text()))
    names = [variant.name for variant in expand_variants(spec.variants)]
    orders = ["order_planned", "order_reverse_planned", "order_random_1", "order_random_3"]
    assert names == [f"{strategy}-{order}" for strategy in ("sequential", "task_arithmetic") for order in orders]
    assert spec.seeds == [0, 1, 2] and spec.recipe == "recipes/continual_cpu.yaml"
    if not (root / spec.recipe).is_file():
        pytest.skip(f"{spec.recipe} is not in this checkout")
    import os

    cwd = os.getcwd()
    os.chdir(root)  # the study's recipe path is relative to the current folder
    try:
        study = load_study(path)
    finally:
        os.chdir(cwd)
    assert len(study.task_names) >= 4 and study.needs_plans
    random_orders = {tuple(study.task_order(v, 0)) for v in study.variants if v.order.startswith("random:")}
    assert len(random_orders) == 2 and tuple(study.task_names) not in random_orders


def test_plan_files_are_reused_only_for_the_same_recipe(tmp_path, monkeypatch):
    from cpt.study import run as study_run

    path = write_study(tmp_path, ["sequential", {"strategy": "sequential", "order": "planned"}])
    study = load_study(path)
    fingerprint = study_run._planning_recipe(study, 0).fingerprint()
    record = {"given": study.task_names, "planned": ["reverse", "upper", "plural"], "recipe_fingerprint": fingerprint}
    study.root.mkdir(parents=True)
    study.plan_path(0).write_text(json.dumps(record))
    study.plan_path(1).write_text(json.dumps({**record, "recipe_fingerprint": "another recipe"}))

    study_run.load_plans(study)  # what `cpt study --summary-only` reads
    assert set(study.plans) == {0}
    assert study.task_order(study.variants[1], 0) == ["reverse", "upper", "plural"]

    planned = []

    def fake_plan_recipe(recipe, cache=None):  # stands for cpt plan: records which seed was planned
        planned.append(recipe.seed)
        raise RuntimeError("planned")

    monkeypatch.setattr("cpt.planning.plan.plan_recipe", fake_plan_recipe)
    assert study_run.plan_seed(study, 0)["planned"] == ["reverse", "upper", "plural"] and planned == []
    with pytest.raises(RuntimeError, match="planned"):
        study_run.plan_seed(study, 1)  # a plan of another recipe is planned again
    assert planned == [1]


def test_predicted_conflict_of_every_variant_order_and_its_relation_to_forgetting(tmp_path):
    """C(π) = Σ_t c(P_t, π(t)) from the plan's recorded step conflicts (METHOD §7), hand-worked; then Spearman's ρ of
    C against each run's forgetting, pooled over seeds."""
    from cpt.study.summary import predicted_conflict_vs_forgetting, predicted_conflicts

    variants = [{"strategy": "sequential", "orders": ["given", "planned", "reverse_planned", "random:1"]}]
    study = load_study(write_study(tmp_path, variants, seeds=(0, 1)))
    names = study.task_names  # plural, upper, reverse

    def conflicts(offset):
        table = {}
        for size in (1, 2):
            for previous in itertools.combinations(names, size):
                for task in names:
                    if task not in previous:
                        # a conflict growing with the task's position in the given order, and with the set's size
                        table[(previous, task)] = offset + 0.1 * names.index(task) + 0.05 * size
        return [{"previous": list(p), "task": t, "conflict": c} for (p, t), c in table.items()]

    for seed, offset in ((0, 0.0), (1, 0.2)):
        fake_plan(study, seed, planned=names)
        study.plans[seed]["conflicts"] = conflicts(offset)
    predicted = predicted_conflicts(study)
    # given order plural → upper → reverse: c({plural}, upper) + c({plural, upper}, reverse) = (0.1 + 0.05) + (0.2 + 0.1)
    assert predicted["sequential"]["0"] == pytest.approx(0.45)
    assert predicted["sequential"]["1"] == pytest.approx(0.45 + 2 * 0.2)
    # reversed: c({reverse}, upper) + c({reverse, upper}, plural) = 0.15 + 0.1
    assert predicted["sequential-order_reverse_planned"]["0"] == pytest.approx(0.25)
    random_1 = random_order(names, 1)
    expected = (0.1 * names.index(random_1[1]) + 0.05) + (0.1 * names.index(random_1[2]) + 0.1)
    assert predicted["sequential-order_random_1"]["0"] == pytest.approx(expected)

    # Runs whose forgetting rises with C on both seeds: ρ = +1.
    finished = {}
    for variant in study.variants:
        for seed in (0, 1):
            run = study.runs_dir / study.run_name(variant, seed)
            (run / "eval").mkdir(parents=True)
            forgetting = predicted[variant.name][str(seed)] / 10
            (run / "eval" / "matrix.json").write_text(json.dumps({"metrics": {"forgetting": forgetting}}))
            finished[(variant.name, seed)] = True
    relation = predicted_conflict_vs_forgetting(study, finished, predicted)
    assert relation["sequential"]["n"] == 8 and relation["sequential"]["rho"] == pytest.approx(1.0)
    assert relation["sequential"]["per_seed"] == {"0": pytest.approx(1.0), "1": pytest.approx(1.0)}
