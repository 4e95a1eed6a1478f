"""CPU thread choice under ``accelerate launch`` (production issue: all cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpt.threads import available_cores, configure_cpu_threads

ACCELERATE_CHILD = {"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}


def choose(environ, launcher_env, cores=8):
    chosen = []
    choice = configure_cpu_threads(
        environ, launcher_env=lambda: launcher_env, cores=lambda: cores, set_threads=chosen.append
    )
    return choice, chosen


def test_accelerate_default_of_one_is_replaced_by_cores_per_local_process():
    choice, chosen = choose({**ACCELERATE_CHILD, "LOCAL_WORLD_SIZE": "2"}, launcher_env={"PATH": "/bin"}, cores=8)
    assert choice.threads == 4 and chosen == [4]
    assert "8 cores available / 2 local processes" in choice.reason


def test_single_process_gets_every_core():
    choice, chosen = choose(dict(ACCELERATE_CHILD), launcher_env={}, cores=2)
    assert (choice.threads, chosen) == (2, [2])


def test_more_processes_than_cores_still_one_thread_each():
    choice, chosen = choose({**ACCELERATE_CHILD, "LOCAL_WORLD_SIZE": "4"}, launcher_env={}, cores=2)
    assert (choice.threads, chosen) == (1, [1])


@pytest.mark.parametrize("variable", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_users_count_given_to_the_launcher_is_kept(variable):
    choice, chosen = choose(dict(ACCELERATE_CHILD), launcher_env={variable: "1"}, cores=8)
    assert chosen == [] and "set by you" in choice.reason


def test_outside_accelerate_torch_default_stands():
    choice, chosen = choose({"OMP_NUM_THREADS": "3"}, launcher_env=None)
    assert chosen == [] and "set by you" in choice.reason
    choice, chosen = choose({}, launcher_env=None)
    assert chosen == [] and "torch's default" in choice.reason


def test_unknown_launcher_environment_keeps_the_count_and_says_how_to_choose():
    choice, chosen = choose(dict(ACCELERATE_CHILD), launcher_env=None)
    assert chosen == [] and "OMP_NUM_THREADS" in choice.reason


def test_cgroup_quota_caps_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cores(affinity=lambda: set(range(8)), cgroup_root=tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(affinity=lambda: set(range(8)), cgroup_root=tmp_path) == 8
    assert available_cores(affinity=lambda: {0, 1, 2}, cgroup_root=tmp_path / "absent") == 3


PROBE = """
import json, torch
from cpt.threads import configure_cpu_threads
choice = configure_cpu_threads()
print("CHOICE " + json.dumps({"threads": choice.threads, "torch": torch.get_num_threads(), "reason": choice.reason}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the launcher's environment from /proc")
@pytest.mark.parametrize("user_threads", [None, "1"])
def test_real_accelerate_launch(tmp_path, user_threads):
    """The real launcher: without a user count the child uses every core, with one it keeps it."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if user_threads is not None:
        env["OMP_NUM_THREADS"] = user_threads
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", str(script)]
    out = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("CHOICE "))
    choice = json.loads(line[len("CHOICE ") :])
    expected = available_cores() if user_threads is None else 1
    assert choice["threads"] == choice["torch"] == expected, choice
