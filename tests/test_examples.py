"""The examples run as users would run them (tiny offline model)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "script, args, expected",
    [
        ("geometry_trl_script.py", ["--steps", "3"], "task 2 upper: mean state-relative conflict 0."),
        (
            "geometry_trl_script.py",
            ["--steps", "3", "--strategy", "task_arithmetic"],
            "task 2 upper: mean state-relative conflict",
        ),
        ("custom_geometry_callback.py", [], "6 MLP tensors measured"),
        ("ewc_trl_script.py", ["--steps", "3"], ""),
    ],
)
def test_example_runs(tmp_path, script, args, expected):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    extra = ["--output-dir", str(tmp_path / "out")] if script != "custom_geometry_callback.py" else []
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *args, *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
