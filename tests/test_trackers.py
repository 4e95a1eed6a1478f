"""Metrics sent to the ``report_to`` trackers, read back from TensorBoard event files (offline)."""

import json
from collections import defaultdict
from pathlib import Path

import pytest

from cpt.evaluation import continual_metrics, general_ability_kept
from cpt.recipe import validate_recipe
from cpt.testing import build_tiny_model

from tiny_recipes import WORDS, make_recipe, write_jsonl

pytest.importorskip("tensorboard", reason="the tracker test reads TensorBoard event files: pip install tensorboard")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def read_scalars(folder: Path) -> dict[str, dict[int, list[float]]]:
    """Every scalar in every event file under ``folder``: tag → step → values (in file order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {folder}"
    for file in files:
        accumulator = EventAccumulator(str(file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                scalars[tag][event.step].append(event.value)
    return scalars


def test_tensorboard_receives_matrix_rows_geometry_and_integration(tmp_path, tiny_model, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    from cpt.runner import TaskSequenceRunner

    probe = write_jsonl(
        tmp_path / "reverse.jsonl", [{"word": w, "answer": w[::-1], "options": [w, w[::-1]]} for w in WORDS]
    )
    data = make_recipe(
        tmp_path,
        tiny_model,
        steps=(2, 2),
        probes=[
            {
                "name": "reverse",
                "data": {"path": probe},
                "fields": {"prompt": "word", "completion": "answer", "choices": "options"},
                "eval": {"kind": "choice", "max_examples": 4},
            }
        ],
    )
    data["training"]["report_to"] = "tensorboard"
    recipe = validate_recipe(data)
    TaskSequenceRunner(recipe).run()
    run_dir = recipe.run_dir
    matrix = json.loads((run_dir / "eval" / "matrix.json").read_text())
    scalars = read_scalars(run_dir / "tensorboard")

    def only(tag: str, step: int) -> float:
        values = scalars[tag][step]
        assert len(values) == 1, f"{tag} at step {step}: {values}"
        return values[0]

    # One accuracy-matrix row per task (0 = base), at the sequence step where the task ended (two optimizer
    # steps per task: rows at 0, 2, 4), from the main process only.
    at = {0: 0, 1: 2, 2: 4}
    for row in range(3):
        for column, task in enumerate(matrix["tasks"]):
            assert only(f"eval/{task}", at[row]) == pytest.approx(matrix["rows"][row][column])
        assert only("eval/probe-reverse", at[row]) == pytest.approx(matrix["probe_rows"][row][0])
    assert set(scalars["eval/plural"]) == {0, 2, 4}
    for row in (1, 2):
        expected = continual_metrics(matrix["rows"][: row + 1])
        for key in ("acc", "fwt"):
            assert only(f"eval/{key}", at[row]) == pytest.approx(expected[key])
    assert 0 not in scalars["eval/acc"] and 2 not in scalars["eval/bwt"]  # undefined there: not logged
    assert only("eval/bwt", 4) == pytest.approx(matrix["metrics"]["bwt"])
    kept = general_ability_kept(matrix["probe_rows"], matrix["probes"])
    if kept["mean"] is not None:
        assert only("eval/general_ability_kept", 4) == pytest.approx(kept["mean"])
        assert only("eval/general_ability_kept/reverse", 4) == pytest.approx(kept["per_probe"]["reverse"])
    else:
        assert "eval/general_ability_kept" not in scalars

    # The trainers' own logs land in the run directory too: the loss at every optimizer step of the
    # sequence (task 2's steps follow task 1's), the geometry aggregates and the integration statistics
    # at each task's last one (2 and 4).
    assert {step: len(values) for step, values in scalars["train/loss"].items()} == {1: 1, 2: 1, 3: 1, 4: 1}
    geometry = json.loads((run_dir / "geometry" / "2_upper.json").read_text())
    assert only("train/geometry/conflict_mean", 4) == pytest.approx(geometry["aggregates"]["geometry_conflict"]["mean"])
    integration = json.loads((run_dir / "integration" / "2_upper.json").read_text())
    assert only("train/integration/seconds", 4) == pytest.approx(integration["seconds"], rel=1e-6)
    assert set(scalars["train/integration/seconds"]) == {2, 4}


def test_merge_run_logs_aggregates_on_one_step_axis_across_a_resume(tmp_path, tiny_model, monkeypatch):
    """A merge strategy's run interrupted after task 1 and resumed by a new process: task 2's series continue
    task 1's (steps from the manifest's records, not from memory), and the trackers get the integration
    aggregates only; per-tensor values (``effective_scale_per_tensor``, OPCM's ``norm_update`` keyed by
    tensor names) stay in the integration file."""
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    from cpt.runner import TaskSequenceRunner

    data = make_recipe(tmp_path, tiny_model, steps=(3, 2), strategy="opcm")
    data["training"]["report_to"] = "tensorboard"
    recipe = validate_recipe(data)

    class Killed(Exception):
        pass

    train_task = TaskSequenceRunner.train_task

    def killed_at_task_2(self, step, task, task_data):
        if step == 2:
            raise Killed
        return train_task(self, step, task, task_data)

    with monkeypatch.context() as patch:
        patch.setattr(TaskSequenceRunner, "train_task", killed_at_task_2)
        with pytest.raises(Killed):
            TaskSequenceRunner(recipe).run()
    TaskSequenceRunner(recipe).run()  # resumes at task 2 with nothing in memory

    run_dir = recipe.run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [record["optimizer_steps"] for record in manifest["tasks"]] == [3, 2]
    scalars = read_scalars(run_dir / "tensorboard")

    # One step axis: task 1's optimizer steps 1-3, task 2's 4-5; each series strictly increasing.
    assert {step: len(values) for step, values in scalars["train/loss"].items()} == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    assert set(scalars["train/learning_rate"]) == {1, 2, 3, 4, 5}
    assert {step: len(values) for step, values in scalars["train/integration/seconds"].items()} == {3: 1, 5: 1}
    assert set(scalars["train/geometry/norm_update_mean"]) == {3, 5}
    assert set(scalars["eval/plural"]) == {0, 3, 5}

    integration = json.loads((run_dir / "integration" / "2_upper.json").read_text())
    summary = integration["summary"]
    per_tensor_keys = set(summary["effective_scale_per_tensor"]) | set(summary["norm_update"])
    assert per_tensor_keys and all("." in name for name in per_tensor_keys)  # the file keeps them
    tags = set(scalars)
    assert not [tag for tag in tags if "per_tensor" in tag or any(name in tag for name in per_tensor_keys)]
    assert scalars["train/integration/summary/effective_scale"][5] == [pytest.approx(summary["effective_scale"])]
    mean_scale = summary["diagnostics"]["effective_scale"]["mean"]
    assert scalars["train/integration/summary/diagnostics/effective_scale/mean"][5] == [pytest.approx(mean_scale)]
    assert scalars["train/integration/summary/lambda"][5] == [pytest.approx(summary["lambda"])]
    assert len([tag for tag in tags if tag.startswith("train/integration/")]) < 30  # aggregates, not ~200 tensors


def test_plan_experts_log_one_after_another_on_one_step_axis(tmp_path, tiny_model, monkeypatch):
    """`cpt plan` trains T experts in one process: a tracker sees expert 2's steps after expert 1's, not again from 1."""
    from cpt.planning.plan import plan_recipe

    from tiny_recipes import three_task_recipe

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path / "cache"))  # every expert trained, none from a cache
    data = three_task_recipe(tmp_path, tiny_model, steps=(2, 3, 2), strategy="task_arithmetic")
    data["training"]["report_to"] = "tensorboard"
    data["training"]["logging_steps"] = 1
    plan_recipe(validate_recipe(data))
    scalars = read_scalars(tmp_path / "tb")
    assert {step: len(values) for step, values in scalars["train/loss"].items()} == dict.fromkeys(range(1, 8), 1)
