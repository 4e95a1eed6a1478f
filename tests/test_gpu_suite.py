"""benchmarks/gpu_suite.sh and prepare_gpu_payload.sh on a CPU: their dry runs, the asset chunks, the wheel check."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_suite_lib  # noqa: E402

STEPS = ["install", "merge_fp32", "merge_tf32", "geometry", "assets", "eval_speed", "zero3", "continual"]


def bash(script: Path, *args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        ["bash", str(script), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def suite_dry_run():
    return bash(REPO / "benchmarks" / "gpu_suite.sh", "--dry-run")


def test_suite_dry_run_checks_everything_and_prints_the_plan(suite_dry_run):
    out = suite_dry_run.stdout
    assert suite_dry_run.returncode == 0, out + suite_dry_run.stderr
    assert out.rstrip().endswith("dry run: ok")
    assert "check: every Python file under cpt/ callbacks/ benchmarks/ compiles" in out
    for script in ("merge_speed.py", "geometry_speed.py", "eval_speed.py", "zero3_vs_plain.py", "continual.py"):
        assert f"check: benchmarks/{script} --help works" in out
    assert "check: -m cpt.cli assets fetch --help works" in out
    assert "wheels: 12 pinned wheels cover the suite's imports on the GPU image" in out
    # every step, in order, with its budget and command; the budgets fit 12 minutes and each part one call
    planned = re.findall(r"^plan: step (\w+) \(budget (\d+) s\): (.+)$", out, re.M)
    assert [step for step, _, _ in planned] == STEPS
    assert sum(int(budget) for _, budget, _ in planned) <= 720
    total = int(re.search(r"^check: the whole suite: (\d+) s of budgets \(≤ 720 s\)$", out, re.M).group(1))
    assert total == sum(int(budget) for _, budget, _ in planned)
    for part in ("kernels", "runs"):
        assert int(re.search(rf"^check: part {part}: (\d+) s", out, re.M).group(1)) <= 570
    commands = {step: command for step, _, command in planned}
    assert commands["merge_fp32"].endswith("merge_speed.py --device cuda --blocks 28")
    assert commands["merge_tf32"].endswith("merge_speed.py --device cuda --blocks 28 --tf32")
    assert "--device cuda" in commands["geometry"] and "--device cuda" in commands["eval_speed"]
    assert "zero3_vs_plain.py" in commands["zero3"] and "continual.py" in commands["continual"]


def test_suite_dry_run_fails_on_a_missing_benchmark_script(tmp_path):
    """A checkout without one of the scripts: non-zero, and a line naming the step and the path."""
    (tmp_path / "benchmarks").mkdir()
    for path in (REPO / "benchmarks").glob("*"):
        if path.is_file() and path.name != "merge_speed.py":
            shutil.copy(path, tmp_path / "benchmarks" / path.name)
    for folder in ("cpt", "callbacks", "recipes"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    result = bash(tmp_path / "benchmarks" / "gpu_suite.sh", "--dry-run", cwd=tmp_path)
    assert result.returncode != 0
    assert "gpu_suite: dry run: step merge_fp32: missing benchmark script benchmarks/merge_speed.py" in result.stdout
    assert "gpu_suite: dry run FAILED" in result.stdout


def test_suite_rejects_an_unknown_part():
    result = bash(REPO / "benchmarks" / "gpu_suite.sh", "--part", "everything", "--dry-run")
    assert result.returncode == 2
    assert "--part 'everything': choose kernels, runs, all or stash" in result.stderr


def test_prepare_dry_run_prints_the_device_calls(tmp_path):
    cache = tmp_path / "empty-cache"
    result = bash(REPO / "benchmarks" / "prepare_gpu_payload.sh", "--dry-run", env={"CPT_CACHE": str(cache)})
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert not cache.exists()  # nothing fetched or written
    pins = bash(REPO / "benchmarks" / "gpu_suite.sh", "--print-wheels").stdout.split()
    for pin in pins:
        assert pin in out  # each wheel is downloaded (or, deepspeed, built) for the GPU's platform
    assert "--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64" in out
    assert "DS_BUILD_OPS=0" in out
    assert "cpt.cli assets fetch bigbench:linguistic_mappings/question_formation_json" in out
    chunk = int(re.search(r"^== chunks → \.gpu_assets/ \(≤ (\d+) MiB each", out, re.M).group(1))
    assert 8 <= chunk <= 60
    calls = re.findall(r"^call (\d+): run\(carry=\[(.*)\], timeout_s=(\d+), command=\"(.*)\"\)$", out, re.M)
    assert [int(number) for number, _, _, _ in calls] == list(range(1, len(calls) + 1))
    assert len(calls) == max(2, -(-94 // chunk))  # the 94 MiB payload: one chunk per call, at least two calls
    assert calls[0][1] == '".whl", ".gpu_assets/part-00"' and calls[0][3].endswith("--part kernels")
    assert calls[-1][3].endswith("--part runs") and '".whl"' in calls[-1][1]
    assert all(int(timeout) <= 600 for _, _, timeout, _ in calls)
    assert out.rstrip().endswith("dry run: ok (nothing downloaded or written)")


def make_cache(root: Path) -> dict[str, bytes]:
    files = {
        "downloads/model-0.1-py3-none-any.whl": os.urandom(5000),
        "datasets/bigbench/a/plural_json/train.jsonl": b'{"input": "cat", "target": "cats"}\n' * 40,
        "datasets/bigbench/a/plural_json/meta.json": b'{"format": 1}',
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_chunks_reassemble_into_the_cache_across_calls(tmp_path):
    files = make_cache(tmp_path / "cache")
    chunks = gpu_suite_lib.pack(
        tmp_path / "cache", ["downloads", "datasets/bigbench/a"], tmp_path / ".gpu_assets", chunk_mib=2048 / 2**20
    )
    assert len(chunks) >= 4 and all(chunk.stat().st_size <= 2048 for chunk in chunks)
    assert [chunk.parent.name for chunk in chunks] == [f"part-{i:02d}" for i in range(len(chunks))]
    manifest = json.loads((chunks[0].parent / gpu_suite_lib.MANIFEST).read_text())
    assert [c["name"] for c in manifest["chunks"]] == [chunk.name for chunk in chunks]
    stash, target = tmp_path / "stash", tmp_path / "gpu-cache"

    # first call: only part-00 travels; the reassembly names what is missing
    first = tmp_path / "call1"
    shutil.copytree(chunks[0].parent, first / "part-00")
    with pytest.raises(SystemExit, match=r"asset chunks missing .*cpt-assets\.tar\.01"):
        gpu_suite_lib.assemble(first, stash, target)
    # a later call carries the rest; the stash kept part-00
    rest = tmp_path / "call2"
    for chunk in chunks[1:]:
        shutil.copytree(chunk.parent, rest / chunk.parent.name)
    assert gpu_suite_lib.assemble(rest, stash, target) == ["downloads", "datasets/bigbench/a"]
    for name, data in files.items():
        assert (target / name).read_bytes() == data


def test_a_damaged_chunk_is_named(tmp_path):
    make_cache(tmp_path / "cache")
    chunks = gpu_suite_lib.pack(tmp_path / "cache", ["downloads"], tmp_path / "out", chunk_mib=4096 / 2**20)
    data = bytearray(chunks[1].read_bytes())
    data[10] ^= 0xFF
    chunks[1].write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"chunk cpt-assets\.tar\.01 is damaged"):
        gpu_suite_lib.assemble(tmp_path / "out", tmp_path / "stash", tmp_path / "gpu-cache")


def test_pack_names_what_the_cache_lacks(tmp_path):
    with pytest.raises(SystemExit, match="not in the asset cache .*datasets/bigbench/x"):
        gpu_suite_lib.pack(tmp_path, ["datasets/bigbench/x"], tmp_path / "out", chunk_mib=1)


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {requirement}\n" for requirement in requires
    )
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata)


def test_wheel_check_finds_uncovered_requirements_and_version_conflicts(tmp_path):
    wheels = tmp_path / "wheels"
    fake_wheel(wheels, "alpha", "1.0", ["transformers>=9", "beta", "numpy", "gamma; extra == 'dev'"])
    fake_wheel(wheels, "beta", "2.0", ["not_on_the_image>=1", 'win-only; sys_platform == "win32"'])
    problems = gpu_suite_lib.check_wheels(REPO, ["alpha==1.0", "beta==2.0"], wheels)
    assert "alpha==1.0 requires transformers>=9, but the GPU would have transformers 5.17.0" in problems
    assert any("beta==2.0 requires not_on_the_image>=1" in problem for problem in problems)
    assert not any("numpy" in problem or "gamma" in problem or "win-only" in problem for problem in problems)
    # the suite's own imports not on the image (trl, deepspeed, pydantic, ...) are reported as not pinned
    assert any(problem.startswith("import trl ") for problem in problems)
    assert any(problem.startswith("import gguf ") for problem in problems)  # indirect: transformers' GGUF loader


def test_wheel_check_wants_exactly_one_file_per_pin(tmp_path):
    wheels = tmp_path / "wheels"
    fake_wheel(wheels, "alpha", "1.0", [])
    fake_wheel(wheels, "alpha", "1.1", [])
    problems = gpu_suite_lib.check_wheels(REPO, ["alpha==1.0"], wheels)
    assert any("want one wheel of alpha==1.0" in problem for problem in problems)
    with pytest.raises(SystemExit, match="pinned twice"):
        gpu_suite_lib.parse_pins(["alpha==1.0", "Alpha==1.1"])


def test_results_section_lists_every_step_and_its_figures(tmp_path):
    (tmp_path / "logs").mkdir()
    rows = [
        ("install", "ok", "0", "12", "40", "python -m pip install ..."),
        ("merge_fp32", "ok", "0", "31", "90", "python benchmarks/merge_speed.py --device cuda --blocks 28"),
        (
            "merge_tf32",
            "timed out",
            "124",
            "70",
            "70",
            "python benchmarks/merge_speed.py --device cuda --blocks 28 --tf32",
        ),
        ("geometry", "failed", "1", "5", "50", "python benchmarks/geometry_speed.py --device cuda"),
        ("eval_speed", "skipped (needs assets)", "-", "-", "40", "python benchmarks/eval_speed.py --device cuda"),
    ]
    # a later call re-ran install: its row comes last in the file, first in the table
    (tmp_path / "status.tsv").write_text("".join("\t".join(row) + "\n" for row in rows[1:] + rows[:1]))
    (tmp_path / "logs" / "merge_fp32.log").write_text(
        "q_proj      2048x1024  x28      1.20 s   c 0.600\n\n"
        "device cuda, torch 2.11.0+cu130, threads 16, tf32 False\n"
        "one continual GCWM step (current_anchor, step t=5, 2 active deltas, 100 Adam iterations per branch) "
        "on 196 tensors: 5.43 s wall (data generation excluded)\n"
        "inner-loop products: 277.0 TFLOP, 51013 GFLOP/s overall\n"
        "peak CUDA memory above the inputs: 3.10 GiB (max over shapes; total peak 9.00 GiB)\n"
    )
    (tmp_path / "logs" / "geometry.log").write_text("Traceback\nRuntimeError: CUDA error: out of memory\n")
    body = gpu_suite_lib.suite_section(tmp_path, "1× NVIDIA H200", "2026-12-01")
    assert "- machine: 1× NVIDIA H200\n- date: 2026-12-01" in body
    assert "| merge_fp32 | ok | 31 | 90 | `python benchmarks/merge_speed.py --device cuda --blocks 28` |" in body
    assert "| merge_tf32 | timed out | 70 | 70 |" in body
    assert "| geometry | failed (exit 1) | 5 | 50 |" in body
    assert "| eval_speed | skipped (needs assets) | - | 40 |" in body
    assert [line.split(" | ")[0][2:] for line in body.splitlines() if line.startswith("| ") and "---" not in line][
        1:
    ] == [row[0] for row in rows]
    assert "on 196 tensors: 5.43 s wall (data generation excluded)" in body
    assert "inner-loop products: 277.0 TFLOP, 51013 GFLOP/s overall" in body
    assert "q_proj" not in body  # per-shape lines stay in the log
    assert "RuntimeError: CUDA error: out of memory" in body  # no figure: the end of the log says why


def test_the_results_know_the_suites_steps_in_its_order():
    text = (REPO / "benchmarks" / "gpu_suite.sh").read_text()
    assert re.search(r"^STEPS=\((.*)\)$", text, re.M).group(1).split() == STEPS == list(gpu_suite_lib.FIGURE_LINES)
