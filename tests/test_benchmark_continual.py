"""benchmarks/continual.py: the study it derives and the RESULTS.md section it writes, on a fake study folder."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
_spec = importlib.util.spec_from_file_location("continual_benchmark", REPO / "benchmarks" / "continual.py")
continual = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(continual)
import results  # noqa: E402  (benchmarks/results.py, on the path above)


def interval(estimate, low, high, distinguishable=None):
    out = {"estimate": estimate, "low": low, "high": high}
    if distinguishable is not None:
        out["distinguishable"] = distinguishable
    return out


def fake_summary() -> dict:
    names = ["sequential", "gcwm", "gcwm-gate-none"]
    stats = {
        "seeds": [0, 1, 2],
        "tasks": ["plural", "past_tense", "negation", "question"],
        "resamples": 2000,
        "confidence": 0.95,
        "example_level": True,
        "variants": {
            "sequential": {
                "acc": interval(0.7, 0.65, 0.75),
                "bwt": interval(-0.3, -0.35, -0.25),
                "forgetting": interval(0.31, 0.26, 0.36),
            },
            "gcwm": {
                "acc": interval(0.875, 0.85, 0.9),
                "bwt": interval(0.02, -0.01, 0.05),
                "forgetting": interval(0.014, 0.0, 0.03),
            },
            "gcwm-gate-none": {
                "acc": interval(0.88, 0.86, 0.9),
                "bwt": interval(0.01, -0.02, 0.04),
                "forgetting": interval(0.02, 0.0, 0.04),
            },
        },
        "pairs": [
            {
                "a": "sequential",
                "b": "gcwm",
                "acc": interval(-0.175, -0.2, -0.15, True),
                "bwt": interval(-0.32, -0.4, -0.25, True),
                "forgetting": interval(0.3, 0.25, 0.35, True),
            },
            {
                "a": "sequential",
                "b": "gcwm-gate-none",
                "acc": interval(-0.18, -0.2, -0.16, True),
                "bwt": interval(-0.31, -0.4, -0.2, True),
                "forgetting": interval(0.29, 0.2, 0.35, True),
            },
            {
                "a": "gcwm",
                "b": "gcwm-gate-none",
                "acc": interval(-0.005, -0.03, 0.02, False),
                "bwt": interval(0.01, -0.02, 0.04, False),
                "forgetting": interval(-0.006, -0.01, -0.001, True),
            },
        ],
    }
    runs = {
        f"{name}-seed0": {
            "train_seconds": 100.0,
            "eval_seconds": 50.0,
            "integration_seconds": 3.0,
            "experts_reused": 0 if name == "sequential" else 2,
        }
        for name in names
    }
    return {
        "study": "continual",
        "recipe": "recipes/continual_cpu.yaml",
        "seeds": [0, 1, 2],
        "seeds_used": [0, 1, 2],
        "pending_runs": [],
        "variants": [
            {"name": "sequential", "strategy": "sequential", "params": {}},
            {"name": "gcwm", "strategy": "gcwm", "params": {}},
            {"name": "gcwm-gate-none", "strategy": "gcwm", "params": {"gate": "none"}},
        ],
        "costs": {
            "runs": runs,
            "train_seconds": 300.0,
            "eval_seconds": 150.0,
            "integration_seconds": 9.0,
            "experts_trained": 8,
            "experts_reused": 4,
        },
        "statistics": stats,
    }


def write_manifest(root: Path, name: str, tasks: list[dict], **extra) -> None:
    (root / "runs" / name).mkdir(parents=True)
    (root / "runs" / name / "manifest.json").write_text(json.dumps({"status": "complete", "tasks": tasks, **extra}))


@pytest.fixture
def study_root(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n\n## Other\n\nkept\n")
    root = tmp_path / "continual"
    root.mkdir()
    (root / "summary.json").write_text(json.dumps(fake_summary()))
    (root / "sittings.json").write_text(json.dumps([{"seconds": 3600.0}, {"seconds": 1800.0}]))
    (root / "alone.json").write_text(
        json.dumps(
            {
                "sequential": {
                    "seed": 0,
                    "wall_seconds": 200.0,
                    "train_seconds": 80.0,
                    "eval_seconds": 70.0,
                    "integration_seconds": 2.0,
                    "base_eval_seconds": 8.0,
                },
                "gcwm": {
                    "seed": 0,
                    "wall_seconds": 700.0,
                    "train_seconds": 90.0,
                    "eval_seconds": 60.0,
                    "integration_seconds": 500.0,
                    "base_eval_seconds": 10.0,
                },
            }
        )
    )

    # sequential trains its own experts and evaluates the base row (10 s); gcwm trains two θ0 experts (40 + 60 s);
    # gcwm-gate-none reuses both and copies the base row.
    def task(train, key=None, hit=None, **seconds):
        record = {"train_seconds": train, "eval_seconds": 5.0, "integration_seconds": 1.0, **seconds}
        if key:
            record["expert_cache"] = {"key": key, "hit": hit}
        return record

    write_manifest(root, "sequential-seed0", [task(30.0), task(30.0)], base_eval_seconds=10.0)
    write_manifest(root, "gcwm-seed0", [task(40.0, "k1", False), task(60.0, "k2", False, geometry_seconds=2.0)])
    write_manifest(
        root, "gcwm-gate-none-seed0", [task(0.5, "k1", True), task(0.5, "k2", True)], base_row_from="sequential-seed0"
    )
    return root


def test_alone_equivalent_charges_reused_experts_and_copied_base_rows(study_root, tmp_path):
    empty_cache = tmp_path / "experts"
    names = ["sequential-seed0", "gcwm-seed0", "gcwm-gate-none-seed0"]
    costs = continual.alone_equivalent(study_root / "runs", names, empty_cache)
    # accounted: sequential 60 + 10 + 10 + 2 = 82; gcwm 100 + 10 + 2 + 2 = 114; gate-none 1 + 10 + 2 = 13
    assert costs == {
        "study_seconds": 209.0,
        "alone_seconds": 209.0 + 40.0 + 60.0 + 10.0,
        "uncharged_experts": 0,
        "experts_trained_before": 0,
        "expert_seconds_before": 0.0,
        "merge_seconds_charged": 0.0,
        "unpriced_merge_steps": 0,
    }
    only_reuser = continual.alone_equivalent(study_root / "runs", ["gcwm-gate-none-seed0"], empty_cache)
    assert only_reuser["uncharged_experts"] == 2 and only_reuser["alone_seconds"] == only_reuser["study_seconds"]
    assert "2 reuses of experts trained outside this study and no longer in the cache" in continual.results_section(
        fake_summary(), [], {}, only_reuser
    )


def test_experts_trained_before_the_study_are_charged_at_their_cache_entrys_seconds(study_root, tmp_path):
    """An earlier study left k1 in the cache (45 s recorded) and k2's entry is gone: two runs reuse both."""
    from cpt.study.expert_cache import ExpertCache

    cache = ExpertCache(tmp_path / "experts")
    cache.store(
        "k1",
        lambda folder: (folder / "weights").write_bytes(b"w"),
        kind="full",
        inputs={},
        extra={"train_seconds": 45.0},
    )
    runs = study_root / "runs"
    write_manifest(study_root, "ties-seed0", [{"train_seconds": 0.5, "expert_cache": {"key": "k1", "hit": True}}])
    write_manifest(study_root, "wudi-seed0", [{"train_seconds": 0.5, "expert_cache": {"key": "k1", "hit": True}}])
    costs = continual.alone_equivalent(runs, ["gcwm-gate-none-seed0", "ties-seed0", "wudi-seed0"], cache.root)
    accounted = 13.0 + 0.5 + 0.5
    # k1: trained once for the study (45 s), and at each of its 3 reuses alone; k2's reuse is priced nowhere
    assert costs["study_seconds"] == accounted + 45.0
    assert costs["alone_seconds"] == accounted + 3 * 45.0
    assert (costs["experts_trained_before"], costs["expert_seconds_before"], costs["uncharged_experts"]) == (1, 45.0, 1)
    body = continual.results_section(fake_summary(), [], {}, costs)
    assert "1 experts were trained before this study" in body and "(45 s together)" in body


def test_alone_equivalent_charges_gcwm_merges_read_at_their_recorded_seconds(study_root):
    # gcwm-norm reads gcwm's step-2 merges (300 s where they were made); a second reader's entries had no seconds.
    def task(merges):
        return {"train_seconds": 0.5, "eval_seconds": 5.0, "integration_seconds": 2.0, "gcwm_merge_cache": merges}

    nothing = {"read": 0, "merged": 0, "seconds_saved": 0.0, "unpriced": 0}
    write_manifest(study_root, "gcwm-norm-seed0", [task(nothing), task({**nothing, "read": 4, "seconds_saved": 300.0})])
    write_manifest(study_root, "gcwm-old-seed0", [task(nothing), task({**nothing, "read": 4, "unpriced": 4})])
    costs = continual.alone_equivalent(study_root / "runs", ["gcwm-norm-seed0", "gcwm-old-seed0"])
    accounted = 2 * (1.0 + 10.0 + 4.0)
    assert costs["study_seconds"] == accounted and costs["alone_seconds"] == accounted + 300.0
    assert costs["merge_seconds_charged"] == 300.0 and costs["unpriced_merge_steps"] == 1
    body = continual.results_section(fake_summary(), [], {}, costs)
    assert "and 300 s of GCWM merges read from a variant that shares m_t" in body
    assert "1 GCWM steps read shared merges stored without their seconds" in body


def test_results_section_from_a_fake_summary(study_root):
    body = continual.record(study_root, "cpu", "python benchmarks/continual.py --seeds 0")
    text = results.RESULTS.read_text()
    assert "## Other\n\nkept" in text and "## Continual benchmark (cpu)" in text and body.strip() in text
    assert "| variant | strategy | parameters | ACC [95 % CI] | BWT | forgetting |" in body
    assert (
        "| sequential | sequential | — | 0.700 [0.650, 0.750] | -0.300 [-0.350, -0.250] | 0.310 [0.260, 0.360] |"
        in body
    )
    assert "| gcwm-gate-none | gcwm | gate=none | 0.880 [0.860, 0.900] | +0.010 [-0.020, +0.040] |" in body
    assert "of 3: ACC 2, BWT 2, forgetting 3; on at least one of them 3" in body
    assert "- wall time: 5400 s (1.50 h) over 2 sitting(s)" in body
    assert "training 300, evaluation 150, integration 9" in body and "8 trained, 4 reused" in body
    assert "209 s in the study against 319 s alone" in body and "0.66× running each strategy alone" in body
    # shared: sequential's base row (it trains from θ_{t-1}); gcwm's base row and its θ0 experts' training
    assert "| sequential | 0 | 200 | 80 / 70 / 2 | 8 | 100 / 50 / 3 |" in body
    assert "| gcwm | 0 | 700 | 90 / 60 / 500 | 100 | 100 / 50 / 3 |" in body
    assert "- command: `python benchmarks/continual.py --seeds 0`" in body
    # Written again (a later sitting), the section is replaced, not repeated.
    continual.record(study_root, "cpu", "again")
    assert results.RESULTS.read_text().count("## Continual benchmark (cpu)") == 1


def test_pending_study_writes_what_it_has(study_root):
    summary = json.loads((study_root / "summary.json").read_text())
    summary.update(statistics=None, note="no seed has finished runs of every variant yet", pending_runs=["gcwm-seed1"])
    text = continual.results_section(summary, [], {}, None)
    assert "Pending runs (not in the table): gcwm-seed1." in text and "no seed has finished" in text


def test_derived_study_keeps_the_folder_and_filters(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    from cpt.study.spec import load_study

    path = continual.derived_study(
        REPO / continual.STUDY, "cpu", [1], ["gcwm-gate-none", "sequential"], tmp_path / "derived.yaml"
    )
    study = load_study(path)
    original = load_study(continual.STUDY)
    assert study.root == original.root and study.spec.seeds == [1]
    assert [v.name for v in study.variants] == ["sequential", "gcwm-gate-none"]  # the study file's order
    assert (
        study.recipe_for(study.variants[1], 1).fingerprint()
        == original.recipe_for(original.variants[18], 1).fingerprint()
    )

    gpu = load_study(continual.derived_study(REPO / continual.STUDY, "gpu", None, None, tmp_path / "gpu.yaml"))
    assert gpu.name == "continual-gpu" and len(gpu.variants) == 21
    recipe = gpu.recipe_for(gpu.variants[0], 0)
    assert recipe.tasks[3].max_examples == 600 and recipe.training["num_train_epochs"] == 3
    assert recipe.evaluation.rows == "needed"  # the study's own overrides stay

    with pytest.raises(SystemExit, match="--variants: gcwm-gate not in"):
        continual.derived_study(REPO / continual.STUDY, "cpu", None, ["gcwm-gate"], tmp_path / "bad.yaml")
    assert yaml.safe_load(path.read_text())["set"] == ["evaluation.rows=needed", "evaluation.evaluate_experts=false"]


def test_a_stopped_sitting_passes_the_signal_on_and_is_timed(tmp_path):
    """A SIGTERM to the driver alone (a scheduler's) reaches `cpt study`, which stops cleanly; the sitting is timed."""
    import os
    import signal
    import threading
    import time

    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    child = (
        "import pathlib, signal, sys, time\n"
        f"def stop(signum, frame): pathlib.Path({str(stopped)!r}).write_text(str(signum)); sys.exit(128 + signum)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )

    def terminate_the_driver_once_the_child_runs():
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        threading.Thread(target=terminate_the_driver_once_the_child_runs, daemon=True).start()
        seconds, status = continual.timed([sys.executable, "-c", child], dict(os.environ), grace_seconds=0.2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert status == 143 and stopped.read_text() == str(int(signal.SIGTERM)), "the child got SIGTERM and stopped"
    assert 0 < seconds < 30
