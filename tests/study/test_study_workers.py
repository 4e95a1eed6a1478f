"""`cpt study --workers N`: how the machine is divided, and two real worker processes on one tiny study."""

import json
import os
import re

import pytest

from cpt.cli import main
from cpt.errors import CptError
from cpt.study.spec import load_study
from cpt.study.workers import worker_slots

from tiny_recipes import FAST_GCWM, study_recipe, write_study


def test_cpu_workers_get_disjoint_cores_and_one_share_of_threads_each():
    slots = worker_slots(2, gpus=[], environ={"PATH": "/bin"}, affinity={0, 1, 2, 3, 4})
    assert [slot.cores for slot in slots] == [[0, 1], [2, 3, 4]]
    assert all(slot.env["OMP_NUM_THREADS"] == slot.env["MKL_NUM_THREADS"] == "2" for slot in slots)
    assert slots[0].env["PATH"] == "/bin" and "CUDA_VISIBLE_DEVICES" not in slots[0].env
    # A thread count the user chose is theirs.
    mine = worker_slots(2, gpus=[], environ={"OMP_NUM_THREADS": "1"}, affinity={0, 1, 2, 3})
    assert [slot.env.get("OMP_NUM_THREADS") for slot in mine] == ["1", "1"] and "MKL_NUM_THREADS" not in mine[0].env
    assert mine[1].description == "CPU core(s) 2,3, 1 thread(s)"


def test_without_cpu_pinning_workers_still_split_the_threads(monkeypatch):
    monkeypatch.delattr("os.sched_setaffinity")  # macOS
    monkeypatch.delattr("os.sched_getaffinity")
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    slots = worker_slots(2, gpus=[], environ={})
    assert [slot.cores for slot in slots] == [None, None]
    assert [slot.env["OMP_NUM_THREADS"] for slot in slots] == ["2", "2"]


def test_gpu_workers_get_one_visible_gpu_each():
    slots = worker_slots(2, gpus=["4", "6", "7"], environ={}, affinity=set(range(8)))
    assert [slot.env["CUDA_VISIBLE_DEVICES"] for slot in slots] == ["4", "6"]
    assert [slot.cores for slot in slots] == [None, None] and slots[0].env["OMP_NUM_THREADS"] == "4"


@pytest.mark.parametrize(
    "workers, gpus, message",
    [
        (3, ["0", "1"], r"--workers 3: only 2 GPU\(s\) visible \(0, 1\); use --workers 2 or fewer"),
        (3, [], r"--workers 3: only 2 CPU core\(s\) available to this process; use --workers 2 or fewer"),
        (0, [], r"--workers must be at least 1, got 0"),
    ],
)
def test_more_workers_than_the_machine_has_is_a_one_line_error(workers, gpus, message):
    with pytest.raises(CptError, match=message):
        worker_slots(workers, gpus=gpus, environ={}, affinity={0, 1})


two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two workers need two cores")


@pytest.mark.slow
@two_cores
def test_two_workers_stop_on_sigterm_then_share_the_rest_each_run_once_and_gcwm_merges_still_shared(
    tmp_path, monkeypatch, capsys
):
    import signal
    import subprocess
    import sys
    import time

    from cpt.study.run import _held_elsewhere
    from cpt.study.summary import run_finished

    recipe = study_recipe(tmp_path, monkeypatch)
    path = write_study(
        tmp_path,
        recipe,
        [{**FAST_GCWM, "step_coef": [0.2, "norm"]}, "task_arithmetic", "sequential"],
        name="two",
        seeds=[0],
        resamples=200,
    )
    study = load_study(path)
    names = [f"{variant.name}-seed0" for variant in study.variants]
    logs = [study.root / "workers" / f"worker-{index}.log" for index in range(2)]

    # 1. A SIGTERM to the parent alone (a scheduler's, `kill PID`) once a worker has started a run: it passes it on.
    parent = subprocess.Popen(
        [sys.executable, "-m", "cpt.cli", "study", str(path), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not any(log.exists() and re.search(r"\[cpt study\] \[\d/4\] ", log.read_text()) for log in logs):
        assert parent.poll() is None and time.monotonic() < deadline, "a worker should have started a run"
        time.sleep(0.2)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=120) == 143
    assert "stopped by SIGTERM; run the same command again to resume" in parent.stderr.read()
    assert all("stopped by SIGTERM" in log.read_text() for log in logs), "each worker stopped cleanly on SIGTERM"
    assert not any(_held_elsewhere(study.runs_dir / name) for name in names), "no worker is left running"
    unfinished = [name for name in names if not run_finished(study.runs_dir / name)]
    assert unfinished, "the study was stopped part-way"
    first_sitting = [log.stat().st_size for log in logs]

    # 2. The same command resumes: every unfinished run is taken by exactly one of the two workers.
    assert main(["study", str(path), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"\[cpt study\] worker 0: CPU core\(s\) \d+, \d+ thread\(s\); log ", err), err
    assert "[worker 1] [cpt study] two: 4 variants × 1 seeds" in err, "the workers' progress is shown"
    second_sitting = [log.read_bytes()[size:].decode() for log, size in zip(logs, first_sitting)]  # sizes in bytes
    taken = {
        name: sum(len(re.findall(rf"\[cpt study\] \[\d/4\] {name}\n", log)) for log in second_sitting) for name in names
    }
    assert taken == {name: int(name in unfinished) for name in names}, (taken, unfinished)
    summary = json.loads((study.root / "summary.json").read_text())
    assert summary["pending_runs"] == [] and summary["seeds_used"] == [0]

    # Whichever worker took the norm variant, it read every merge of gcwm at 0.2 (put off while it ran elsewhere).
    tasks = json.loads((study.runs_dir / "gcwm-step_coefnorm-seed0" / "manifest.json").read_text())["tasks"]
    assert [task["gcwm_merge_cache"]["merged"] for task in tasks] == [0, 0, 0]
    assert all(task["gcwm_merge_cache"]["read"] > 0 for task in tasks[1:])
    assert not (study.root / "merges").exists() and not list(study.runs_dir.glob(".*.lock"))
