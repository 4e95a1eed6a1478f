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

    # One accuracy-matrix row per step (0 = base), at step = task index, from the main process only.
    for row in range(3):
        for column, task in enumerate(matrix["tasks"]):
            assert only(f"eval/{task}", row) == pytest.approx(matrix["rows"][row][column])
        assert only("eval/probe-reverse", row) == pytest.approx(matrix["probe_rows"][row][0])
    assert set(scalars["eval/plural"]) == {0, 1, 2}
    for row in (1, 2):
        expected = continual_metrics(matrix["rows"][: row + 1])
        for key in ("acc", "fwt"):
            assert only(f"eval/{key}", row) == pytest.approx(expected[key])
    assert 0 not in scalars["eval/acc"] and 1 not in scalars["eval/bwt"]  # undefined there: not logged
    assert only("eval/bwt", 2) == pytest.approx(matrix["metrics"]["bwt"])
    kept = general_ability_kept(matrix["probe_rows"], matrix["probes"])
    if kept["mean"] is not None:
        assert only("eval/general_ability_kept", 2) == pytest.approx(kept["mean"])
        assert only("eval/general_ability_kept/reverse", 2) == pytest.approx(kept["per_probe"]["reverse"])
    else:
        assert "eval/general_ability_kept" not in scalars

    # The trainers' own logs land in the run directory too: the loss, the geometry aggregates and
    # the integration statistics, at each task's last optimizer step (2).
    assert scalars["train/loss"]
    geometry = json.loads((run_dir / "geometry" / "2_upper.json").read_text())
    assert scalars["train/geometry/conflict_mean"][2][-1] == pytest.approx(
        geometry["aggregates"]["geometry_conflict"]["mean"]
    )
    integration = json.loads((run_dir / "integration" / "2_upper.json").read_text())
    assert scalars["train/integration/seconds"][2][-1] == pytest.approx(integration["seconds"], rel=1e-6)
