"""Training that stalls or explodes with finite numbers stops the task and keeps the last good state."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from cpt.cli import main
from cpt.errors import TrainingDivergedError
from cpt.recipe import validate_recipe
from cpt.testing import build_tiny_model
from cpt.training.divergence import DivergenceMonitor

from tiny_recipes import make_recipe


def feed(monitor: DivergenceMonitor, logs: list[dict]) -> None:
    state = SimpleNamespace(global_step=0)
    monitor.on_train_begin(None, state, None, model=None)
    for step, entry in enumerate(logs, start=1):
        state.global_step = step
        monitor.on_log(None, state, None, logs=entry)


def test_zero_gradient_after_the_first_logged_step():
    # The first logged step does not count; then 3 zero norms in a row trip it.
    with pytest.raises(
        TrainingDivergedError, match=r"gradient norm was 0 for 3 logged steps in a row \(up to step 4\)"
    ):
        feed(DivergenceMonitor(patience=3), [{"loss": 5.0 - i, "grad_norm": 0.0} for i in range(4)])
    feed(DivergenceMonitor(patience=3), [{"loss": 5.0 - i, "grad_norm": 0.0} for i in range(3)])  # one short
    # A non-zero norm in between restarts the count.
    norms = [1.0, 0.0, 0.0, 0.5, 0.0, 0.0]
    feed(DivergenceMonitor(patience=3), [{"loss": 5.0 - i, "grad_norm": g} for i, g in enumerate(norms)])


def test_flat_loss():
    with pytest.raises(
        TrainingDivergedError, match=r"loss stayed at 6.23832 for 4 logged steps in a row \(up to step 5\)"
    ):
        feed(
            DivergenceMonitor(patience=3),
            [{"loss": 6.3, "grad_norm": 1.0}] + [{"loss": 6.238325, "grad_norm": 1.0}] * 4,
        )
    # Healthy noise of 1e-4 relative is movement.
    feed(DivergenceMonitor(patience=3), [{"loss": 2.0 + 2e-4 * (i % 2), "grad_norm": 1.0} for i in range(10)])
    # Eval logs and the end-of-training summary are not training steps.
    feed(
        DivergenceMonitor(patience=1), [{"eval_loss": 1.0}, {"train_loss": 1.0}, {"loss": 1.0}, {"train_runtime": 1.0}]
    )


def test_weight_growth():
    model = torch.nn.Linear(4, 4)
    monitor = DivergenceMonitor(max_weight_growth=100.0)
    state = SimpleNamespace(global_step=1)
    monitor.on_train_begin(None, state, None, model=model)
    start = DivergenceMonitor.weight_norm(model)
    assert start == pytest.approx(torch.cat([model.weight.flatten(), model.bias.flatten()]).norm().item())
    with torch.no_grad():
        model.weight.mul_(50.0)
    monitor.on_log(None, state, None, logs={"loss": 1.0})  # < 100-fold: fine
    with torch.no_grad():
        model.weight.mul_(10.0)
        model.bias.mul_(500.0)
    with pytest.raises(TrainingDivergedError, match=r"weights' norm grew 500-fold .* limit 100"):
        monitor.on_log(None, state, None, logs={"loss": 0.9})


def test_recipe_section_and_fingerprint(tmp_path):
    data = make_recipe(tmp_path, "model")
    default = validate_recipe(data)
    assert default.divergence.patience == 3 and default.divergence.max_weight_growth == 100.0
    tuned = validate_recipe({**data, "divergence": {"patience": 5}})
    assert tuned.fingerprint() == default.fingerprint(), "thresholds may change on resume"
    assert DivergenceMonitor.from_spec(validate_recipe({**data, "divergence": {"enabled": False}}).divergence) is None


@pytest.mark.slow
def test_learning_rate_1e6_stops_the_task_and_keeps_the_state(tmp_path, capsys):
    """The issue's case: lr 1e6 on a real tiny-model run drives the weights up and the gradient to 0."""
    model = build_tiny_model(tmp_path / "model", seed=0)
    data = make_recipe(tmp_path, model, steps=(2, 8))
    data["tasks"][1]["training"]["learning_rate"] = 1e6
    data["geometry"] = {"enabled": False}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    code = main(["run", str(recipe_path)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1, err[-2000:]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: task 2 (upper): training stalled or diverged: ")
    run_dir = tmp_path / "runs" / "tiny"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [task["status"] for task in manifest["tasks"]] == ["done", "failed"]
    assert "stalled or diverged" in manifest["tasks"][1]["error"]
    marker = json.loads((run_dir / "state" / "cpt_state.json").read_text())
    assert marker["step"] == 1, "the last good state (after task 1) stays in place"
