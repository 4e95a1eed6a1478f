"""Run reports and comparisons (cpt.report, `cpt report`, `cpt compare`) on hand-built and real run directories."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from cpt.cli import main
from cpt.errors import CptError
from cpt.report import (
    MATRIX_PLOT,
    SCATTER_PLOT,
    SCORES_PLOT,
    TENSOR_PLOT,
    compare_runs,
    forgetting_pairs,
    load_run,
    short_tensor_name,
    tensor_order_key,
    write_report,
)

TASKS = ["plural", "past_tense", "negation"]
# R[i][j]: row 0 = base, row i = after task i.
MATRIX = [
    [0.10, 0.20, 0.30],
    [0.90, 0.25, 0.30],
    [0.85, 0.80, 0.35],
    [0.75, 0.40, 0.90],
]
EXPERTS = [0.90, 0.85, 0.95]
# By hand (METHOD §5): ACC = (0.75+0.4+0.9)/3; BWT = ((0.75−0.9) + (0.4−0.8))/2;
# FWT = ((0.25−0.20) + (0.35−0.30))/2; forgetting = ((0.9−0.75) + (0.8−0.4))/2.
ACC, BWT, FWT, FORGETTING = 2.05 / 3, -0.275, 0.05, 0.275
# Forgetting pairs (t, j): drops (2,1) 0.05, (3,1) 0.10, (3,2) 0.40.

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = [
    f"model.layers.{layer}.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}.weight"
    for layer in (1, 0)
    for m in reversed(MODULES)
]


def conflict_value(step: int, name: str) -> float | None:
    """Known per-tensor conflicts: undefined at step 1; rising with depth and with the step."""
    if step == 1:
        return None
    layer = int(name.split(".")[2])
    return round(0.1 * step + 0.05 * layer + 0.01 * MODULES.index(name.split(".")[-2]), 6)


def norm_value(step: int, name: str) -> float:
    return round({1: 0.3, 2: 0.2, 3: 0.1}[step] + 0.001 * MODULES.index(name.split(".")[-2]), 6)


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def geometry_file(step: int, with_aggregates: bool = True) -> dict:
    per_tensor = {
        name: {
            "geometry_conflict": conflict_value(step, name),
            "norm_update": norm_value(step, name),
            "sar_update_to_state": 0.5,
        }
        for name in NAMES
    }
    report = {"step": step, "task": TASKS[step - 1], "num_tensors": len(NAMES), "per_tensor": per_tensor}
    if with_aggregates:
        conflicts = [f["geometry_conflict"] for f in per_tensor.values()]
        attention = [v for n, v in zip(per_tensor, conflicts) if "self_attn" in n]
        mlp = [v for n, v in zip(per_tensor, conflicts) if ".mlp." in n]
        defined = [c for c in conflicts if c is not None]
        report["aggregates"] = {
            "geometry_conflict": {
                "mean": mean(conflicts),
                "count": len(defined),
                "undefined": len(conflicts) - len(defined),
                "by_family": {"attention": mean(attention), "mlp": mean(mlp)} if defined else {},
            },
            "norm_update": {"mean": mean([f["norm_update"] for f in per_tensor.values()])},
        }
    return report


def step_conflict(step: int) -> float:
    return mean([conflict_value(step, n) for n in NAMES])


def step_norm(step: int) -> float:
    return mean([norm_value(step, n) for n in NAMES])


def make_run(
    root: Path,
    *,
    name="synthetic",
    strategy="sequential",
    tasks=TASKS,
    rows=None,
    completed=3,
    geometry=True,
    geometry_aggregates=True,
    matrix=True,
) -> Path:
    """A run directory as the runner writes it, by hand: manifest, matrix, geometry, integration."""
    rows = [list(r) for r in (rows or MATRIX)]
    rows += [None] * (len(tasks) + 1 - len(rows))
    rows = [r if i <= completed else None for i, r in enumerate(rows)]
    root.mkdir(parents=True)
    records = []
    for step, task in enumerate(tasks, 1):
        record = {
            "name": task,
            "status": "done" if step <= completed else ("training" if step == completed + 1 else "pending"),
        }
        if step <= completed:
            record.update(train_seconds=10.0 * step, integration_seconds=0.5 * step, eval_seconds=2.0, final_loss=0.1)
        records.append(record)
    manifest = {
        "format": 1,
        "run_name": name,
        "recipe_fingerprint": "feedc0de12345678",
        "strategy": strategy,
        "status": "complete" if completed == len(tasks) else "running",
        "tasks": records,
        "base_eval_seconds": 1.5,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    if matrix:
        (root / "eval").mkdir()
        experts = [e if i < completed else None for i, e in enumerate(EXPERTS[: len(tasks)])]
        (root / "eval" / "matrix.json").write_text(
            json.dumps({"tasks": list(tasks), "rows": rows, "expert_scores": experts})
        )
    if geometry:
        (root / "geometry").mkdir()
        for step in range(1, completed + 1):
            (root / "geometry" / f"{step}_{tasks[step - 1]}.json").write_text(
                json.dumps(geometry_file(step, geometry_aggregates))
            )
    return root


def expected_pairs(completed: int = 3):
    """The pairs the report defines: step t ≥ 2, earlier task j < t, y = R[t−1][j] − R[t][j]."""
    return [(t, j, MATRIX[t - 1][j - 1] - MATRIX[t][j - 1]) for t in range(2, completed + 1) for j in range(1, t)]


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


# ---------------------------------------------------------------------- full synthetic run
@pytest.mark.parametrize("aggregates", [True, False], ids=["aggregates", "per_tensor_only"])
def test_report_of_a_finished_run(tmp_path, aggregates):
    run = make_run(tmp_path / "run", geometry_aggregates=aggregates)
    path = write_report(run)
    text = path.read_text()
    assert path == run / "report.md"

    assert "# Run report: synthetic" in text and "`sequential`" in text and "`feedc0de12345678`" in text
    assert f"| ACC | {ACC:.3f} |" in text
    assert f"| BWT | {BWT:+.3f} |" in text
    assert f"| FWT | {FWT:+.3f} |" in text
    assert f"| forgetting | {FORGETTING:.3f} |" in text
    assert f"ACC {ACC:.3f}  BWT {BWT:+.3f}  FWT {FWT:+.3f}  forgetting {FORGETTING:.3f}" in text  # format_matrix_table
    assert "after past_tense" in text and "expert" in text

    # Timings from the manifest, with totals.
    assert "| 2 | past_tense | done | 20.0 | 1.00 | - | 2.0 | 0.1000 |" in text
    assert "| **total** |  | 60.0 | 3.00 |" in text

    # Geometry summary: per-step mean conflict, attention vs MLP, top-5.
    c2, c3 = step_conflict(2), step_conflict(3)
    attention3 = mean([conflict_value(3, n) for n in NAMES if "self_attn" in n])
    mlp3 = mean([conflict_value(3, n) for n in NAMES if ".mlp." in n])
    assert f"| 3 | negation | {c3:.4f} | {attention3:.4f} | {mlp3:.4f} | {step_norm(3):.4g} | 14 (0) |" in text
    top3 = sorted(NAMES, key=lambda n: -conflict_value(3, n))[:5]
    assert f"`{top3[0]}` {conflict_value(3, top3[0]):.4f}" in text and top3[0] == "model.layers.1.mlp.down_proj.weight"

    # Spearman over exactly the pairs the report defines, as scipy computes it.
    pairs = expected_pairs()
    x_conflict = [{2: c2, 3: c3}[t] for t, _, _ in pairs]
    x_norm = [{2: step_norm(2), 3: step_norm(3)}[t] for t, _, _ in pairs]
    y = [drop for _, _, drop in pairs]
    rho, p = spearmanr(x_conflict, y)
    rho_norm, p_norm = spearmanr(x_norm, y)
    assert rho == pytest.approx(math.sqrt(3) / 2) and rho_norm == pytest.approx(-math.sqrt(3) / 2)  # x ties at t = 3
    assert f"Spearman(conflict, forgetting): ρ = {rho:.4f}, p = {p:.4g} (n = 3)" in text
    assert f"Spearman(‖Δ‖, forgetting): ρ = {rho_norm:.4f}, p = {p_norm:.4g} (n = 3)" in text
    assert "| 3 | past_tense | +0.4000 |" in text  # the pair (t=3, j=2): R[2][2] − R[3][2]

    for name in (MATRIX_PLOT, SCORES_PLOT, TENSOR_PLOT, SCATTER_PLOT):
        assert f"](plots/{name})" in text
        assert_png(run / "plots" / name)
    assert not list(run.rglob("*.tmp")), "no temporary files left behind"


def test_pairs_and_tensor_order():
    rows = [list(r) for r in MATRIX]
    data_geometry = {}
    from cpt.report.loading import _step_geometry

    for step in (1, 2, 3):
        data_geometry[step] = _step_geometry(step, TASKS[step - 1], geometry_file(step))
    pairs = forgetting_pairs(rows, data_geometry)
    assert [(p.step, p.task) for p in pairs] == [(2, 1), (3, 1), (3, 2)]
    assert [p.drop for p in pairs] == pytest.approx([d for _, _, d in expected_pairs()])
    assert [p.conflict for p in pairs] == pytest.approx([step_conflict(2), step_conflict(3), step_conflict(3)])
    # A missing entry drops its pair only; no geometry for a step leaves x undefined.
    rows[2][0] = None
    del data_geometry[3]
    pairs = forgetting_pairs(rows, data_geometry)
    assert [(p.step, p.task) for p in pairs] == [(3, 2)] and pairs[0].conflict is None

    ordered = sorted(NAMES, key=tensor_order_key)
    assert [short_tensor_name(n) for n in ordered] == [
        "L0 q_proj",
        "L0 k_proj",
        "L0 v_proj",
        "L0 o_proj",
        "L1 q_proj",
        "L1 k_proj",
        "L1 v_proj",
        "L1 o_proj",
        "L0 gate_proj",
        "L0 up_proj",
        "L0 down_proj",
        "L1 gate_proj",
        "L1 up_proj",
        "L1 down_proj",
    ]


# ---------------------------------------------------------------------- partial and incomplete runs
def test_report_of_a_run_in_progress(tmp_path):
    run = make_run(tmp_path / "run", completed=1)
    text = write_report(run).read_text()
    assert "status: running — 1 of 3 tasks done" in text
    assert "(after 1 of 3 tasks)" in text and "Run in progress" in text
    assert f"| ACC | {MATRIX[1][0]:.3f} |" in text and "| BWT | - |" in text
    assert "Spearman(conflict, forgetting): not enough points: 3 pairs needed (n = 0)" in text
    assert_png(run / "plots" / MATRIX_PLOT)
    assert_png(run / "plots" / SCORES_PLOT)
    assert not (run / "plots" / SCATTER_PLOT).exists()  # no pair yet
    assert not (run / "plots" / TENSOR_PLOT).exists()  # step 1's conflict is undefined everywhere

    # Two steps: one pair, still not enough points, but the scatter and heatmap are drawn.
    run2 = make_run(tmp_path / "run2", completed=2)
    text = write_report(run2).read_text()
    assert "not enough points: 3 pairs needed (n = 1)" in text
    assert_png(run2 / "plots" / SCATTER_PLOT)
    assert_png(run2 / "plots" / TENSOR_PLOT)


def test_report_without_base_row(tmp_path):
    # evaluation.evaluate_base: false leaves row 0 empty; rows keep their step index.
    run = make_run(tmp_path / "run")
    matrix = json.loads((run / "eval" / "matrix.json").read_text())
    matrix["rows"][0] = None
    (run / "eval" / "matrix.json").write_text(json.dumps(matrix))
    text = write_report(run).read_text()
    assert f"| ACC | {ACC:.3f} |" in text and f"| BWT | {BWT:+.3f} |" in text and "| FWT | - |" in text
    assert "Spearman(conflict, forgetting): ρ = 0.8660" in text


def test_report_without_geometry(tmp_path):
    run = make_run(tmp_path / "run")
    write_report(run)
    assert (run / "plots" / TENSOR_PLOT).exists()

    # A run made before geometry existed (or with it disabled): said so; conflict plots gone.
    for file in (run / "geometry").iterdir():
        file.unlink()
    (run / "geometry").rmdir()
    text = write_report(run).read_text()
    assert "No geometry diagnostics" in text and "Spearman" not in text
    assert not (run / "plots" / TENSOR_PLOT).exists() and not (run / "plots" / SCATTER_PLOT).exists()
    assert_png(run / "plots" / MATRIX_PLOT)
    assert f"| ACC | {ACC:.3f} |" in text


def test_report_without_evaluations_and_with_a_broken_geometry_file(tmp_path):
    run = make_run(tmp_path / "run", completed=0, matrix=False, geometry=False)
    text = write_report(run).read_text()
    assert "No evaluation results yet" in text and not (run / "plots").exists()

    run = make_run(tmp_path / "run2", completed=3)
    (run / "geometry" / "3_negation.json").write_text("{ truncated")
    text = write_report(run).read_text()
    assert "skipped geometry/3_negation.json" in text
    assert "No geometry file for step(s) 3." in text
    assert "not enough points: 3 pairs needed (n = 1)" in text  # only t = 2 keeps an x


def test_not_a_run_directory(tmp_path, capsys):
    with pytest.raises(CptError, match="not a cpt run directory"):
        load_run(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a cpt run manifest" in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a folder" in err
    assert main(["compare", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------------- compare
def test_compare_runs(tmp_path, capsys):
    a = make_run(tmp_path / "a" / "seq", name="seq")
    other = [[0.1, 0.2, 0.3], [0.8, 0.3, 0.3], [0.7, 0.9, 0.3], [0.7, 0.8, 0.6]]
    b = make_run(tmp_path / "b" / "merge", name="merge", strategy="gcwm", rows=other)
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "compare.md").read_text()
    assert table in printed
    # merge: ACC = (0.7+0.8+0.6)/3; BWT = ((0.7−0.8) + (0.8−0.9))/2; FWT = ((0.3−0.2) + (0.3−0.3))/2;
    # forgetting = ((0.8−0.7) + (0.9−0.8))/2.
    assert "| seq | sequential | 3/3 | 0.683 | -0.275 | +0.050 | 0.275 | 60.0 | 3.00 |" in table
    assert "| merge | gcwm | 3/3 | 0.700 | -0.100 | +0.050 | 0.100 | 60.0 | 3.00 |" in table
    assert "Warning" not in table and "Tasks: plural, past_tense, negation" in table
    assert_png(out / "compare.png")

    # Different task lists still compare, with a warning; a partial run shows its progress.
    c = make_run(
        tmp_path / "c" / "seq", name="seq", tasks=["plural", "upper"], rows=[[0.0, 0.1], [0.5, 0.2]], completed=1
    )
    table = compare_runs([a, c], out)
    assert "Warning: the runs are on different task lists" in table.splitlines()[2]
    assert (
        "| a/seq | sequential | 3/3 | 0.683 |" in table
        and "| c/seq | sequential | 1/2 | 0.500 | - | +0.100 | - | 10.0 | 0.50 |" in table
    )
    assert_png(out / "compare.png")


# ---------------------------------------------------------------------- a real run
def test_report_of_a_real_tiny_run(tmp_path, capsys, monkeypatch):
    from cpt.recipe import validate_recipe
    from cpt.runner import TaskSequenceRunner
    from cpt.testing import build_tiny_model

    from tiny_recipes import make_recipe

    model = build_tiny_model(tmp_path / "model", seed=0)
    recipe = validate_recipe(make_recipe(tmp_path, model, steps=(2, 2)))
    TaskSequenceRunner(recipe).run()
    run = recipe.run_dir
    assert "report: " in capsys.readouterr().err
    auto = (run / "report.md").read_text()  # written by the runner at the end of the run

    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"report written to {run / 'report.md'}"
    text = (run / "report.md").read_text()
    assert text == auto
    metrics = json.loads((run / "eval" / "matrix.json").read_text())["metrics"]
    assert f"| ACC | {metrics['acc']:.3f} |" in text and "# Run report: tiny" in text
    geometry = json.loads((run / "geometry" / "2_upper.json").read_text())
    assert f"{geometry['aggregates']['geometry_conflict']['mean']:.4f}" in text
    assert "not enough points: 3 pairs needed (n = 1)" in text  # two tasks: one (step, task) pair
    for name in (MATRIX_PLOT, SCORES_PLOT, TENSOR_PLOT, SCATTER_PLOT):
        assert_png(run / "plots" / name)

    # A failing report never fails a finished run: one warning line instead.
    def broken(run_dir):
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr("cpt.report.write_report", broken)
    TaskSequenceRunner(recipe).run()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"[cpt] warning: no report written (RuntimeError: disk full second line); try `cpt report {run}`"
    ]


def test_compare_shows_intervals_when_runs_carry_seeds(tmp_path):
    """Runs named <variant>-seed<s> (as `cpt study` names them) get the METHOD §6 intervals in compare.md."""
    from cpt.evaluation.outcomes import outcomes_path
    from cpt.report.comparison import compare_runs
    from cpt.study.statistics import bootstrap_study
    from cpt.study.summary import read_run_outcomes

    rng = np.random.default_rng(0)
    run_dirs = []
    for variant, skill in (("good", 0.9), ("poor", 0.4)):
        for seed in (0, 1, 2):
            root = make_run(tmp_path / f"{variant}-seed{seed}", name=f"{variant}-seed{seed}", strategy=variant)
            (root / "recipe.yaml").write_text(f"seed: {seed}\n")
            rows = []
            for row in range(len(TASKS) + 1):
                scores = []
                for column, task in enumerate(TASKS):
                    # learnt tasks stay at the variant's skill, unlearnt ones at 0.1
                    correct = rng.random(40) < (skill if 0 < row and column < row else 0.1)
                    lines = [json.dumps({"id": i, "correct": bool(c)}) for i, c in enumerate(correct)]
                    outcomes_path(root / "eval", row, task).write_text("\n".join(lines) + "\n")
                    scores.append(float(correct.mean()))
                rows.append(scores)
            (root / "eval" / "matrix.json").write_text(
                json.dumps({"tasks": list(TASKS), "rows": rows, "expert_scores": [None] * len(TASKS)})
            )
            run_dirs.append(root)
    text = compare_runs(run_dirs, tmp_path)
    assert "## Intervals over seeds" in text and "paired cluster bootstrap over seeds and eval examples" in text
    expected = bootstrap_study(
        [read_run_outcomes(tmp_path / f"{v}-seed{s}", v, s) for v in ("good", "poor") for s in (0, 1, 2)]
    ).as_dict()
    acc = expected["variants"]["good"]["acc"]
    assert f"{acc['estimate']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}]" in text
    pair = expected["pairs"][0]
    assert pair["acc"]["distinguishable"] and f"**{pair['acc']['estimate']:+.3f}" in text
    # One seed per variant: no interval section.
    assert "Intervals over seeds" not in compare_runs(run_dirs[::3], tmp_path / "one")
