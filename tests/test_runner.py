"""End-to-end continual runs on a tiny random model built offline (seconds, no downloads)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cpt.errors import CptError, TrainingDivergedError
from cpt.recipe import validate_recipe
from cpt.runner import TaskSequenceRunner
from cpt.testing import build_tiny_model

from tiny_recipes import WORDS, make_recipe


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def state_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "state" / "model.safetensors")


def test_two_task_sequential_run(tmp_path, tiny_model):
    recipe = validate_recipe(make_recipe(tmp_path, tiny_model))
    result = TaskSequenceRunner(recipe).run()
    run_dir = recipe.run_dir

    assert len(result.matrix) == 3 and all(len(row) == 2 for row in result.matrix)
    assert all(0.0 <= score <= 1.0 for row in result.matrix for score in row)
    assert all(score is not None for score in result.expert_scores)
    # Sequential: the state after the last task is its expert, so they score the same.
    assert result.matrix[2][1] == pytest.approx(result.expert_scores[1])
    assert set(result.metrics) >= {"acc", "bwt", "fwt", "forgetting"}
    assert result.metrics["acc"] == pytest.approx(sum(result.matrix[2]) / 2)

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert [task["status"] for task in manifest["tasks"]] == ["done", "done"]
    assert manifest["tasks"][0]["train_examples"] == len(WORDS) - 4
    assert manifest["versions"]["trl"] and manifest["recipe_fingerprint"] == recipe.fingerprint()
    assert all(task["train_seconds"] > 0 for task in manifest["tasks"])
    import resource  # the peak RSS is this process's (the runner ran in it), in GiB, never decreasing

    now_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peaks = [task["peak_host_rss_gib"] for task in manifest["tasks"]]
    assert 0.05 < peaks[0] <= peaks[1] <= now_gib + 1e-3
    matrix = json.loads((run_dir / "eval" / "matrix.json").read_text())
    assert matrix["rows"] == result.matrix and matrix["tasks"] == ["plural", "upper"]
    assert (run_dir / "recipe.yaml").exists() and (run_dir / "integration" / "2_upper.json").exists()

    # Per-example outcomes of every evaluation: base row, each step's row, each expert; they add up to the matrix.
    from cpt.evaluation.outcomes import outcomes_path, read_outcomes

    for row in range(3):
        for column, name in enumerate(["plural", "upper"]):
            records = read_outcomes(outcomes_path(run_dir / "eval", row, name))
            assert [record["id"] for record in records] == list(range(len(records))) and records
            assert sum(record["correct"] for record in records) / len(records) == pytest.approx(
                result.matrix[row][column]
            )
    expert = read_outcomes(outcomes_path(run_dir / "eval", "expert", "upper"))
    assert sum(record["correct"] for record in expert) / len(expert) == pytest.approx(result.expert_scores[1])
    wrong_after_last = sum(not r["correct"] for r in read_outcomes(outcomes_path(run_dir / "eval", 2, "plural")))
    report = (run_dir / "report.md").read_text()
    assert ("## Wrong answers after step 2" in report) == (wrong_after_last > 0 or result.matrix[2][1] < 1)

    # Geometry runs for every task: undefined at t=1 (the state is still θ0), measured at t=2.
    first = json.loads((run_dir / "geometry" / "1_plural.json").read_text())
    second = json.loads((run_dir / "geometry" / "2_upper.json").read_text())
    assert first["aggregates"]["geometry_conflict"]["mean"] is None and first["num_tensors"] == 14
    assert 0.0 < second["aggregates"]["geometry_conflict"]["mean"] <= 1.0
    assert manifest["tasks"][1]["geometry_conflict_mean"] == second["aggregates"]["geometry_conflict"]["mean"]

    # The state is a loadable HF folder with its tokenizer and the step it holds.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert json.loads((run_dir / "state" / "cpt_state.json").read_text()) == {"step": 2, "task": "upper"}
    AutoTokenizer.from_pretrained(run_dir / "state")
    state = AutoModelForCausalLM.from_pretrained(run_dir / "state")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = [name for name, tensor in state.state_dict().items() if not torch.equal(tensor, base.state_dict()[name])]
    assert any("q_proj" in name for name in changed)
    assert not list(run_dir.glob("work/*")), "trainer scratch output is removed after each task"

    # Running the finished recipe again does nothing and returns the same matrix.
    again = TaskSequenceRunner(recipe).run()
    assert again.matrix == result.matrix


def test_lora_run_writes_merged_state(tmp_path, tiny_model):
    data = make_recipe(tmp_path, tiny_model, steps=(3, 3))
    data["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    recipe = validate_recipe(data)
    TaskSequenceRunner(recipe).run()
    weights = state_weights(recipe.run_dir)
    assert not any("lora" in name for name in weights), "the state holds merged full weights, no adapter"
    base = load_file(Path(tiny_model) / "model.safetensors")
    assert set(weights) == set(base)
    for name in weights:
        differs = not torch.equal(weights[name], base[name])
        assert differs == ("q_proj" in name or "v_proj" in name), name


def test_different_recipe_refused_unless_overwrite(tmp_path, tiny_model):
    recipe = validate_recipe(make_recipe(tmp_path, tiny_model, steps=(1, 1)))
    TaskSequenceRunner(recipe).run()
    changed = validate_recipe(make_recipe(tmp_path, tiny_model, steps=(2, 1)))
    with pytest.raises(CptError, match="holds a run of a different recipe .* pass --overwrite"):
        TaskSequenceRunner(changed).run()
    manifest = json.loads((recipe.run_dir / "manifest.json").read_text())
    assert manifest["recipe_fingerprint"] == recipe.fingerprint(), "the refused run touched nothing"
    TaskSequenceRunner(changed, overwrite=True).run()
    assert json.loads((recipe.run_dir / "manifest.json").read_text())["recipe_fingerprint"] == changed.fingerprint()


def test_non_finite_loss_stops_task_and_keeps_state(tmp_path, tiny_model):
    data = make_recipe(tmp_path, tiny_model, steps=(2, 6))
    data["tasks"][1]["training"]["learning_rate"] = 1e38
    data["tasks"][1]["training"]["max_grad_norm"] = 0  # no clipping: let it blow up
    recipe = validate_recipe(data)
    # The loss guard (next step's loss) or, first, the divergence monitor (the weights after this step) stops it.
    with pytest.raises(
        TrainingDivergedError,
        match=r"task 2 \(upper\): training (loss became (nan|inf)|stalled or diverged: the weights became non-finite)",
    ):
        TaskSequenceRunner(recipe).run()
    manifest = json.loads((recipe.run_dir / "manifest.json").read_text())
    assert manifest["tasks"][0]["status"] == "done" and manifest["tasks"][1]["status"] == "failed"
    marker = json.loads((recipe.run_dir / "state" / "cpt_state.json").read_text())
    assert marker["step"] == 1, "the last good state (after task 1) stays in place"
    assert all(torch.isfinite(t).all() for t in state_weights(recipe.run_dir).values())


# ---------------------------------------------------------------------- resume after kills
def _start(recipe_path: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cpt.cli", "run", str(recipe_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when(process: subprocess.Popen, manifest: Path, condition, timeout=300, how=signal.SIGKILL) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"run ended before the kill point: {process.stderr.read()[-2000:]}"
        try:
            state = json.loads(manifest.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = None
        if state and condition(state):
            process.send_signal(how)
            process.wait()
            return state
        time.sleep(0.02)
    process.kill()
    raise AssertionError("kill point never reached")


@pytest.mark.slow
def test_resume_after_kills_matches_uninterrupted_run(tmp_path, tiny_model):
    steps = (6, 300)  # task 2 trains long enough to be killed in the middle
    (tmp_path / "ref").mkdir()
    reference = validate_recipe(make_recipe(tmp_path / "ref", tiny_model, steps=steps))
    expected = TaskSequenceRunner(reference).run()

    (tmp_path / "killed").mkdir()
    data = make_recipe(tmp_path / "killed", tiny_model, steps=steps)
    recipe_path = tmp_path / "killed" / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    manifest = tmp_path / "killed" / "runs" / "tiny" / "manifest.json"

    # 1. Stop between tasks with SIGTERM, as a scheduler does: task 1 done, task 2 not started. It takes Ctrl-C's
    #    clean stop (cpt.stopping): exit 143 and one line, no traceback.
    process = _start(recipe_path)
    seen = _kill_when(process, manifest, lambda m: m["tasks"][0]["status"] == "done", how=signal.SIGTERM)
    assert seen["tasks"][1]["status"] in ("pending", "training")
    assert process.returncode == 143
    assert process.stderr.read().strip().splitlines()[-1] == "stopped by SIGTERM; run the same command again to resume"
    # 2. Kill in the middle of task 2's training.
    process = _start(recipe_path)
    seen = _kill_when(
        process, manifest, lambda m: m["tasks"][1]["status"] == "training" and m["tasks"][1].get("started")
    )
    after_kill = json.loads(manifest.read_text())
    assert after_kill["tasks"][1]["status"] == "training", "the kill landed mid-task"
    # 3. The same command finishes the run.
    finished = subprocess.run(
        [sys.executable, "-m", "cpt.cli", "run", str(recipe_path)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]

    matrix = json.loads((tmp_path / "killed" / "runs" / "tiny" / "eval" / "matrix.json").read_text())
    assert matrix["rows"] == expected.matrix
    assert matrix["expert_scores"] == expected.expert_scores
    resumed_state = state_weights(tmp_path / "killed" / "runs" / "tiny")
    reference_state = state_weights(reference.run_dir)
    for name, tensor in reference_state.items():
        torch.testing.assert_close(resumed_state[name], tensor, rtol=0, atol=0, msg=name)


def test_without_base_row_indices_keep_their_meaning(tmp_path, tiny_model):
    data = make_recipe(tmp_path, tiny_model, steps=(2, 2))
    data["evaluation"]["evaluate_base"] = False
    recipe = validate_recipe(data)
    result = TaskSequenceRunner(recipe).run()
    assert result.matrix[0] is None and len(result.matrix) == 3 and None not in result.matrix[1]
    matrix = json.loads((recipe.run_dir / "eval" / "matrix.json").read_text())
    # BWT compares R[2][1] with R[1][1]: row indices must not shift when row 0 is missing.
    assert matrix["metrics"]["bwt"] == pytest.approx(result.matrix[2][0] - result.matrix[1][0])
    assert matrix["metrics"]["fwt"] is None, "FWT needs the base row"
