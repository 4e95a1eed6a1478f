"""`cpt study`: spec expansion, summaries from run directories, and real tiny studies (slow)."""

import json
import os
from pathlib import Path

import pytest
import yaml

from cpt.cli import main
from cpt.errors import CptError
from cpt.study.run import run_study
from cpt.study.spec import load_study
from cpt.study.summary import build_summary, read_run_outcomes, write_summary
from cpt.testing import build_tiny_model

from tiny_recipes import count_trainings, make_recipe
from tiny_recipes import write_study as write_study_files


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def write_study(tmp_path: Path, model: str, variants, seeds=(0, 1), **extra) -> Path:
    recipe = make_recipe(tmp_path, model, steps=(2, 2))
    return write_study_files(tmp_path, recipe, variants, name="s", seeds=seeds, resamples=500, **extra)


def test_variants_expand_grids_with_deterministic_names(tmp_path):
    path = write_study(
        tmp_path,
        "unused-model",
        [
            "sequential",
            {"strategy": "ties", "density": [0.2, 0.5], "scaling": [0.3, 1]},
            {"strategy": "task_arithmetic", "name": "ta", "scaling": 0.3},
        ],
    )
    study = load_study(path)
    assert [v.name for v in study.variants] == [
        "sequential",
        "ties-density0.2-scaling0.3",
        "ties-density0.2-scaling1",
        "ties-density0.5-scaling0.3",
        "ties-density0.5-scaling1",
        "ta",
    ]
    assert study.variants[2].params == {"density": 0.2, "scaling": 1}
    recipe = study.recipe_for(study.variants[1], 1)
    assert recipe.name == "ties-density0.2-scaling0.3-seed1" and recipe.seed == 1
    assert recipe.strategy.name == "ties" and recipe.strategy.params == {"density": 0.2, "scaling": 0.3}
    assert recipe.run_dir == tmp_path / "studies" / "s" / "runs" / "ties-density0.2-scaling0.3-seed1"


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"variants": [{"strategy": "ties", "densty": 0.3}]},
            (
                r"variant ties, seed 0\): strategy\.densty: unknown parameter of strategy 'ties' "
                r"\(did you mean 'density'\?\)"
            ),
        ),
        ({"variants": [{"strategy": "tys"}]}, r"tys"),
        ({"variants": ["sequential", "sequential"]}, r"name\(s\) sequential come out twice"),
        ({"seeds": [1, 1]}, r"seeds: .*repeat a seed"),
        (
            {"statistics": {"resample": 10}},
            r"statistics.resample: unknown key; accepted keys: resamples, confidence, seed",
        ),
        ({"varients": []}, r"varients: unknown key; accepted keys: recipe, name"),
        ({"variants": [{"strategy": "ties", "density": []}]}, r"ties.density is an empty list"),
    ],
)
def test_bad_study_files_are_one_line_errors(tmp_path, change, message):
    path = write_study(tmp_path, "unused-model", ["sequential"])
    data = yaml.safe_load(path.read_text())
    data.update(change)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CptError, match=message) as info:
        load_study(path)
    assert "\n" not in str(info.value)


def fake_run(root: Path, name: str, matrix_rows, outcomes=None):
    """A finished run directory with a score matrix and, optionally, per-example files."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "manifest.json").write_text(
        json.dumps({"status": "complete", "tasks": [{"train_seconds": 2.0, "eval_seconds": 1.0}]})
    )
    (run / "eval" / "matrix.json").write_text(
        json.dumps({"tasks": ["a"], "rows": matrix_rows, "expert_scores": [None]})
    )
    for (row, task), correct in (outcomes or {}).items():
        lines = [json.dumps({"id": f"ex{k}", "prediction": "x", "correct": bool(c)}) for k, c in enumerate(correct)]
        (run / "eval" / f"{row}_{task}.jsonl").write_text("\n".join(reversed(lines)) + "\n")  # order must not matter


def test_summary_from_run_directories(tmp_path):
    path = write_study(tmp_path, "unused-model", ["sequential", "average"], seeds=[0, 1])
    study = load_study(path)
    runs = study.runs_dir
    good, bad = [1] * 9 + [0], [1] * 5 + [0] * 5
    fake_run(runs, "sequential-seed0", [[0.1], [0.9]], {(1, "a"): good})
    fake_run(runs, "sequential-seed1", [[0.1], [0.9]], {(1, "a"): good})
    fake_run(runs, "average-seed0", [[0.1], [0.5]], {(1, "a"): bad})
    outcomes = read_run_outcomes(runs / "sequential-seed0", "sequential", 0)
    assert outcomes.ids["a"] == [f"ex{k}" for k in range(10)] and outcomes.correct[1]["a"].tolist() == good

    partial = build_summary(study)
    assert partial["seeds_used"] == [0] and partial["pending_runs"] == ["average-seed1"]
    fake_run(runs, "average-seed1", [[0.1], [0.5]], {(1, "a"): bad})
    summary = write_summary(study)
    stats = summary["statistics"]
    assert stats["example_level"] and stats["seeds"] == [0, 1]
    assert stats["variants"]["sequential"]["acc"]["estimate"] == pytest.approx(0.9)
    pair = stats["pairs"][0]
    assert (pair["a"], pair["b"]) == ("sequential", "average") and pair["acc"]["estimate"] == pytest.approx(0.4)
    text = (study.root / "summary.md").read_text()
    assert "| sequential | sequential | - | 0.900 [" in text and "ACC 1/1" in text and "**+0.400 [" in text
    assert (study.root / "summary.png").stat().st_size > 1000
    assert summary["costs"]["train_seconds"] == 8.0

    # Without per-example files in one run, every run falls back to the score matrix (seed level), and says so.
    (runs / "average-seed1" / "eval" / "1_a.jsonl").unlink()
    summary = write_summary(study)
    assert not summary["statistics"]["example_level"] and "resample seeds only" in summary["note"]
    assert summary["statistics"]["pairs"][0]["acc"]["estimate"] == pytest.approx(0.4)


def statistics_of(study_root: Path) -> dict:
    return json.loads((study_root / "summary.json").read_text())["statistics"]


@pytest.mark.slow
def test_study_end_to_end_shares_experts_and_resumes(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path / "cache"))
    path = write_study(tmp_path, tiny_model, ["task_arithmetic", "average"], seeds=[0, 1])
    study = load_study(path)

    # Killed during the third training: seed 0's two runs are finished, seed 1's first run is half-way.
    with monkeypatch.context() as patch:
        trainings = count_trainings(patch, fail_at=3)
        with pytest.raises(KeyboardInterrupt):
            run_study(study)
    assert trainings[:2] and len(trainings) == 3
    assert (study.runs_dir / "average-seed0" / "manifest.json").exists()

    trainings = count_trainings(monkeypatch)
    assert main(["study", str(path)]) == 0
    # Seed 1 trains its two experts once (task_arithmetic); average reuses them: 2 trainings in the resume.
    assert len(trainings) == 2
    for seed in (0, 1):
        manifest = json.loads((study.runs_dir / f"average-seed{seed}" / "manifest.json").read_text())
        assert [t["expert_cache"]["hit"] for t in manifest["tasks"]] == [True, True], (
            "the second θ0 strategy trains nothing"
        )
        assert manifest["base_row_from"] == f"task_arithmetic-seed{seed}" and "base_eval_seconds" not in manifest
        rows = {
            name: json.loads((study.runs_dir / f"{name}-seed{seed}" / "eval" / "matrix.json").read_text())["rows"][0]
            for name in ("task_arithmetic", "average")
        }
        assert rows["average"] == rows["task_arithmetic"]
    summary = json.loads((study.root / "summary.json").read_text())
    assert summary["pending_runs"] == [] and summary["seeds_used"] == [0, 1]
    assert summary["costs"]["experts_trained"] == 4 and summary["costs"]["experts_reused"] == 4
    assert set(summary["statistics"]["variants"]) == {"task_arithmetic", "average"}
    assert (study.root / "summary.png").exists() and "Paired differences" in (study.root / "summary.md").read_text()
    # Every run directory is a normal one that `cpt report` reads.
    assert main(["report", str(study.runs_dir / "average-seed1")]) == 0

    # The resumed study's statistics equal an uninterrupted study's (here with every expert from the cache).
    fresh = tmp_path / "fresh.yaml"
    data = yaml.safe_load(path.read_text())
    data["name"] = "fresh"
    fresh.write_text(yaml.safe_dump(data))
    run_study(load_study(fresh))
    assert len(trainings) == 2, "a later study with the same keys trains nothing"
    assert statistics_of(study.root) == statistics_of(tmp_path / "studies" / "fresh")
    # Starting a finished study again runs nothing and rebuilds the same summary.
    run_study(study)
    assert len(trainings) == 2 and statistics_of(study.root) == statistics_of(tmp_path / "studies" / "fresh")


@pytest.mark.slow
def test_a_run_held_by_another_process_is_left_to_it(tmp_path, tiny_model, monkeypatch):
    """Two `cpt study` on one study (one per GPU): each takes the runs no other process holds."""
    from cpt.lock import RunLock

    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path / "cache"))
    study = load_study(write_study(tmp_path, tiny_model, ["task_arithmetic", "average", "ties"], seeds=[0]))
    logs: list[str] = []
    monkeypatch.setattr("cpt.study.run.log", logs.append)
    trainings = count_trainings(monkeypatch)
    elsewhere = RunLock(study.runs_dir / "average-seed0")  # what the other process holds while it runs
    elsewhere.acquire()
    try:
        summary = run_study(study)
    finally:
        elsewhere.release()
    assert not (study.runs_dir / "average-seed0").exists(), "a run another process holds is not touched"
    assert any(line == "[2/3] average-seed0: running in another process, skipped" for line in logs), logs
    assert summary["pending_runs"] == ["average-seed0"] and summary["seeds_used"] == []
    finished = json.loads((study.runs_dir / "ties-seed0" / "manifest.json").read_text())
    assert finished["status"] == "complete" and "weights_removed" in finished
    assert not any((study.runs_dir / "ties-seed0" / name).exists() for name in ("state", "history", "work"))
    assert (study.runs_dir / "ties-seed0" / "eval" / "matrix.json").exists(), "the results stay"
    assert not list(study.runs_dir.glob(".*.lock")) and len(trainings) == 2

    summary = run_study(study)  # the other process is gone: the run is this one's
    assert summary["pending_runs"] == [] and summary["seeds_used"] == [0] and len(trainings) == 2


def test_a_plan_lock_held_elsewhere_is_waited_for_or_put_off(tmp_path, monkeypatch):
    import threading

    from cpt.lock import RunLock
    from cpt.study.run import _plan_lock

    logs: list[str] = []
    monkeypatch.setattr("cpt.study.run.log", logs.append)
    monkeypatch.setattr("cpt.study.run.POLL_SECONDS", 0.05)
    holder = RunLock(tmp_path / "plan-seed0")  # another process planning seed 0
    holder.acquire()
    with _plan_lock(tmp_path / "plan-seed0", 0, wait=False) as held:
        assert held is False and logs == []
    threading.Timer(0.3, holder.release).start()
    with _plan_lock(tmp_path / "plan-seed0", 0, wait=True) as held:
        assert held is True and not holder.held
        assert json.loads((tmp_path / ".plan-seed0.lock").read_text())["pid"] == os.getpid()
    assert logs == ["seed 0: another process is planning the task order; waiting for it"]
    assert not (tmp_path / ".plan-seed0.lock").exists()


def test_shipped_study_file_is_valid():
    study = load_study(Path(__file__).resolve().parents[2] / "studies" / "quickstart.yaml")
    assert [v.name for v in study.variants] == ["sequential", "gcwm", "task_arithmetic", "ties"]
    assert study.spec.seeds == [0, 1, 2] and study.root == Path("runs/studies/quickstart")


def test_cache_commands(tmp_path, monkeypatch, capsys):
    from cpt.study.expert_cache import ExpertCache

    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path))
    cache = ExpertCache()
    assert cache.root == tmp_path / "experts"
    with cache.claim("abc") as entry:
        assert entry is None
        cache.store(
            "abc",
            lambda folder: (folder / "model.safetensors").write_bytes(b"x" * 2048),
            kind="full",
            inputs={},
            extra={"label": "plural"},
        )
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'experts'}: 1 experts" in out and "abc" in out and "plural" in out
    assert main(["cache", "clear"]) == 0 and "removed 1 experts" in capsys.readouterr().out
    assert cache.entries() == []


def test_removing_a_finished_runs_weights_keeps_its_results_and_says_so(tmp_path):
    from cpt.study.run import remove_weights

    run = tmp_path / "ta-seed0"
    for folder in ("state", "history/step-1", "strategy", "eval", "geometry"):
        (run / folder).mkdir(parents=True)
        (run / folder / "file").write_text("x")
    (run / "manifest.json").write_text(json.dumps({"status": "complete", "tasks": []}))
    assert remove_weights(run)
    assert sorted(path.name for path in run.iterdir()) == ["eval", "geometry", "manifest.json"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["weights_removed"]
    assert not remove_weights(run) and json.loads((run / "manifest.json").read_text()) == manifest


def test_a_study_stops_in_one_line_before_a_run_the_disk_cannot_hold(tmp_path, tiny_model, monkeypatch, capsys):
    import shutil

    path = write_study(tmp_path, tiny_model, ["task_arithmetic"], seeds=[0])
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda where: usage._replace(free=1000))
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: output_dir: 0.00 GB free on the disk of ") and "Traceback" not in "".join(err)
    assert not (load_study(path).runs_dir / "task_arithmetic-seed0").exists(), "nothing started"
