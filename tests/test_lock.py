"""The run lock: a second process on the same run directory is refused; a dead holder's lock is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cpt.lock import RunLock, RunLockedError, lock_path

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from cpt.lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "HF_HUB_OFFLINE": "1"}


def _hold(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_process_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    holder = _hold(run_dir)
    try:
        recorded = json.loads(lock_path(run_dir).read_text())
        assert recorded["pid"] == holder.pid and recorded["host"] == socket.gethostname()
        # A second real process trying the same lock.
        second = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from cpt.lock import RunLock; RunLock(sys.argv[1]).acquire()",
                str(run_dir),
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode != 0 and "RunLockedError" in second.stderr
        assert f"pid {holder.pid} on {socket.gethostname()}, started {recorded['started']}" in second.stderr
        with pytest.raises(
            RunLockedError,
            match=rf"in use by another cpt run \(pid {holder.pid} on .*\); wait for it to finish, or delete "
            rf".*\.tiny\.lock",
        ):
            RunLock(run_dir).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    holder = _hold(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(run_dir).exists(), "kill -9 leaves the lock file behind"
    with RunLock(run_dir) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock_path(run_dir).exists(), "released on exit"


def test_reused_pid_and_other_hosts(tmp_path):
    run_dir = tmp_path / "tiny"
    path = lock_path(run_dir)
    # Our own (alive) pid, but recorded with another process start time: the pid was reused.
    path.write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "then", "process_start": 1})
    )
    with RunLock(run_dir):
        pass
    # A holder on another host cannot be checked from here: refused, with the file to delete.
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(RunLockedError, match=r"pid 1 on elsewhere, started 2026-01-01T00:00:00\+00:00.*delete"):
        RunLock(run_dir).acquire()
    assert json.loads(path.read_text())["host"] == "elsewhere", "a refused process leaves the holder's lock alone"


def test_cpt_run_refused_while_another_run_holds_the_directory(tmp_path):
    from cpt.testing import build_tiny_model

    from tiny_recipes import make_recipe

    model = build_tiny_model(tmp_path / "model", seed=0)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(make_recipe(tmp_path, model)))
    run_dir = tmp_path / "runs" / "tiny"
    holder = _hold(run_dir)
    try:
        started = time.perf_counter()
        second = subprocess.run(
            [sys.executable, "-m", "cpt.cli", "run", str(recipe_path)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    lines = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"in use by another cpt run (pid {holder.pid}" in lines[0]
    assert not run_dir.exists(), "the refused run created nothing"
    assert time.perf_counter() - started < 120
