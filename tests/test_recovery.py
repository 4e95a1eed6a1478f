"""``--overwrite`` never loses a finished run; resume removes every staging leftover of a killed run."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from cpt.cli import main
from cpt.recipe import validate_recipe
from cpt.recovery import clean_staging, move_aside, previous_path, recover_interrupted_overwrite
from cpt.runner import TaskSequenceRunner
from cpt.testing import build_tiny_model

from tiny_recipes import make_recipe


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    """A finished 2-task run (1 step each) and its recipe data."""
    root = tmp_path_factory.mktemp("finished")
    data = make_recipe(root, tiny_model, steps=(1, 1))
    TaskSequenceRunner(validate_recipe(data)).run()
    return root, data


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_overwrite_with_a_broken_recipe_keeps_the_finished_run(finished_run, tmp_path, capsys):
    root, data = finished_run
    run_dir = Path(data["output_dir"]) / data["name"]
    before = tree_digest(run_dir)
    broken = {**data, "seed": 4, "model": {"name_or_path": str(tmp_path / "no-such-model")}}
    recipe_path = tmp_path / "broken.yaml"
    recipe_path.write_text(yaml.safe_dump(broken))
    code = main(["run", str(recipe_path), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "model.name_or_path" in err and "Traceback" not in err
    assert tree_digest(run_dir) == before, "the finished run is intact, byte for byte"
    assert not previous_path(run_dir).exists()


def test_interrupted_overwrite_brings_the_old_run_back(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text('{"recipe_fingerprint": "old"}')
    (run_dir / "state").mkdir()
    (run_dir / "state" / "model.safetensors").write_bytes(b"weights")
    before = tree_digest(run_dir)
    move_aside(run_dir)
    run_dir.mkdir()  # the replacement was killed before it wrote its manifest
    (run_dir / "recipe.yaml").write_text("half")
    assert recover_interrupted_overwrite(run_dir) == "restored"
    assert tree_digest(run_dir) == before and not previous_path(run_dir).exists()
    # The replacement had started (manifest written): the old run is dropped instead.
    move_aside(run_dir)
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"recipe_fingerprint": "new"}')
    assert recover_interrupted_overwrite(run_dir) == "dropped"
    assert (
        not previous_path(run_dir).exists()
        and json.loads((run_dir / "manifest.json").read_text())["recipe_fingerprint"] == "new"
    )


def test_overwrite_replaces_the_run_once_the_new_one_started(tmp_path, tiny_model):
    old = validate_recipe(make_recipe(tmp_path, tiny_model, steps=(1, 1)))
    TaskSequenceRunner(old).run()
    new = validate_recipe(make_recipe(tmp_path, tiny_model, steps=(1, 1), seed=5))
    TaskSequenceRunner(new, overwrite=True).run()
    manifest = json.loads((new.run_dir / "manifest.json").read_text())
    assert manifest["recipe_fingerprint"] == new.fingerprint() and manifest["status"] == "complete"
    assert not previous_path(new.run_dir).exists(), "deleted once the new run had started"


def _make_leftovers(run_dir: Path) -> None:
    (run_dir / "history" / ".step-2.k3j9.tmp" / "task_vector").mkdir(parents=True)
    (run_dir / "history" / ".step-2.k3j9.tmp" / "task_vector" / "a.safetensors").write_bytes(b"x")
    (run_dir / "history" / "step-1").mkdir(parents=True, exist_ok=True)
    (run_dir / "history" / "step-1.old").mkdir()  # its final folder exists: dropped
    (run_dir / "history" / "step-3.old").mkdir()  # its final folder is missing: restored
    (run_dir / "history" / "step-3.old" / "scalars.json").write_text("{}")
    (run_dir / "strategy" / "ewc" / ".step_2.ab.tmp").mkdir(parents=True)
    (run_dir / "strategy" / "replay").mkdir(parents=True)
    (run_dir / "strategy" / "replay" / ".plural.jsonl.x1.tmp").write_text("half")
    (run_dir / ".manifest.json.zz.tmp").write_text("{")
    (run_dir / "geometry").mkdir(exist_ok=True)
    (run_dir / "geometry" / ".1_plural.safetensors.q.tmp").write_bytes(b"")
    (run_dir / ".state.w1.tmp").mkdir()
    (run_dir / "work" / "plural" / "checkpoint-1").mkdir(parents=True)  # task done: not needed
    (run_dir / "work" / "upper" / "checkpoint-2").mkdir(parents=True)  # task to resume: kept
    (run_dir / "work" / "upper" / "expert").mkdir()  # a half-gathered ZeRO-3 expert: rebuilt


def test_clean_staging_removes_every_leftover(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "matrix.json").write_text("{}")
    _make_leftovers(run_dir)
    manifest = {"tasks": [{"name": "plural", "status": "done"}, {"name": "upper", "status": "training"}]}
    cleaned = clean_staging(run_dir, manifest)
    assert len(cleaned) == 10
    remaining = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    assert remaining == [
        "eval",
        "eval/matrix.json",
        "geometry",
        "history",
        "history/step-1",
        "history/step-3",
        "history/step-3/scalars.json",
        "strategy",
        "strategy/ewc",
        "strategy/replay",
        "work",
        "work/upper",
        "work/upper/checkpoint-2",
    ]


def test_resume_cleans_leftovers_of_a_killed_run(finished_run):
    root, data = finished_run
    recipe = validate_recipe(data)
    before = tree_digest(recipe.run_dir)
    _make_leftovers(recipe.run_dir)
    TaskSequenceRunner(recipe).run()
    leftovers = [p for p in recipe.run_dir.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []
    assert not (recipe.run_dir / "work" / "plural").exists() and not (recipe.run_dir / "work" / "upper").exists(), (
        "both tasks are done"
    )
    # Everything else is as the finished run left it (the manifest's time stamp and the report are rewritten).
    rewritten = ("manifest.json", "report.md", "plots/", "history/step-3/scalars.json")
    after = tree_digest(recipe.run_dir)
    assert {k: v for k, v in after.items() if not k.startswith(rewritten)} == {
        k: v for k, v in before.items() if not k.startswith(rewritten)
    }
    assert "state/model.safetensors" in after


@pytest.mark.slow
def test_kill_during_gcwm_integration_leaves_nothing_after_resume(tmp_path, tiny_model):
    """kill -9 while GCWM writes its history staging folder; the resumed run completes with no leftover."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = make_recipe(
        tmp_path,
        tiny_model,
        steps=(1, 1),
        strategy={"name": "gcwm", "iters": 300, "skip_tol": 0.0},  # the history staging lasts the whole batch loop
        geometry={"enabled": False},
    )
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "runs" / "tiny"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "cpt.cli", "run", str(recipe_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    staged = []
    while time.time() < deadline and process.poll() is None:
        staged = list((run_dir / "history").glob(".step-*.tmp")) if (run_dir / "history").is_dir() else []
        if staged:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert staged, "the kill point (GCWM writing history) was never reached"
    assert list((run_dir / "history").glob(".step-*.tmp")), "the kill left the staging folder"
    assert (run_dir / ".tiny.lock").exists() is False and (tmp_path / "runs" / ".tiny.lock").exists(), (
        "and a stale lock"
    )

    finished = subprocess.run(
        [sys.executable, "-m", "cpt.cli", "run", str(recipe_path)], env=env, capture_output=True, text=True, timeout=900
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    leftovers = [str(p) for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []
    assert not (run_dir / "work").exists() or not any((run_dir / "work").iterdir())
    assert not (tmp_path / "runs" / ".tiny.lock").exists()
