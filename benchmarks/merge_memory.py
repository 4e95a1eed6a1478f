"""Peak host memory of continual merge steps against the size of one model (issue: GCWM).

    python benchmarks/merge_memory.py --model smollm2-135m-instruct --tasks 5 --method gcwm --set iters=5

Writes ``--tasks`` synthetic experts of the model (θ0 + a rank-8 perturbation of every
weight, saved as safetensors), then runs one ``cpt merge`` over them in a child process
whose resident memory is sampled every 10 ms, and reports the peak of each step. The claim to
check: the peak stays ≤ 1.5× one model's size and does not grow with the number of tasks
(current_anchor). The inner Adam iterations do not change memory, only time, hence the
small ``iters`` by default.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent


def make_experts(base: str, count: int, folder: Path) -> list[Path]:
    from transformers import AutoModelForCausalLM

    paths = []
    for index in range(count):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 2:
                    left = torch.randn(param.shape[0], 8, generator=generator)
                    right = torch.randn(8, param.shape[1], generator=generator)
                    param.add_(1e-3 * left @ right)
        path = folder / f"expert{index + 1}"
        model.save_pretrained(path)
        paths.append(path)
        del model
    return paths


def anonymous_rss(pid: int) -> int:
    """Resident anonymous memory (heap, tensors) of ``pid``: RSS without file-backed pages.

    safetensors memory-maps the weight files it reads; those clean page-cache pages count
    in RSS while mapped but are reclaimable, so they are reported apart.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_per_step(command: list[str]) -> tuple[list[dict], int]:
    """Run ``command`` (``cpt merge``), sampling the memory of its process every 10 ms;
    returns each step's peak RSS, peak anonymous RSS and wall time (steps split at the
    "[cpt] merged" lines) and the peak RSS over the whole run."""
    # stderr (progress bars) goes to a file: an unread pipe would fill up and stall the merge.
    errors = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=errors, text=True)
    handle = psutil.Process(process.pid)
    current = {"peak": 0, "anon": 0}
    overall = 0
    lock = threading.Lock()

    def sample() -> None:
        nonlocal overall
        while process.poll() is None:
            try:
                rss = handle.memory_info().rss
                anon = anonymous_rss(process.pid)
            except (psutil.Error, OSError):
                break
            with lock:
                current["peak"] = max(current["peak"], rss)
                current["anon"] = max(current["anon"], anon)
                overall = max(overall, rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    steps, started = [], time.perf_counter()
    for line in process.stdout:
        if line.startswith("[cpt] merged"):
            now = time.perf_counter()
            with lock:
                steps.append(
                    {
                        "step": len(steps) + 1,
                        "peak_rss_bytes": current["peak"],
                        "peak_anon_bytes": current["anon"],
                        "seconds": now - started,
                    }
                )
                current["peak"] = current["anon"] = 0
            started = now
    process.wait()
    errors.seek(0)
    stderr = errors.read()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(stderr[-3000:])
    return steps, overall


def baseline_rss() -> int:
    """Resident memory of a process that only imports what ``cpt merge`` imports."""
    probe = "import torch, transformers, safetensors, cpt.merging.gcwm, psutil, os; print(psutil.Process(os.getpid()).memory_info().rss)"
    return int(
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO).stdout
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="asset name or local HF folder")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--method", default="gcwm")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=None,
        help="strategy parameters (default: iters=5 — memory does not depend on it)",
    )
    args = parser.parse_args()

    from cpt.assets import resolve_model

    args.overrides = args.overrides or ["iters=5"]
    base = resolve_model(args.model)
    model_bytes = sum(p.stat().st_size for p in Path(base).glob("*.safetensors"))
    imports = baseline_rss()
    with tempfile.TemporaryDirectory() as scratch:
        experts = make_experts(base, args.tasks, Path(scratch))
        command = [
            sys.executable,
            "-m",
            "cpt.cli",
            "merge",
            "--method",
            args.method,
            base,
            *map(str, experts),
            "--output",
            str(Path(scratch) / "merged"),
        ] + [item for pair in args.overrides for item in ("--set", pair)]
        steps, overall = peak_rss_per_step(command)
    for step in steps:
        step["peak_rss_gib"] = round(step.pop("peak_rss_bytes") / 2**30, 3)
        anon = step.pop("peak_anon_bytes")
        step["peak_anonymous_gib"] = round(anon / 2**30, 3)
        step["anonymous_over_model"] = round(anon / model_bytes, 3)
        step["seconds"] = round(step["seconds"], 1)
    print(
        json.dumps(
            {
                "model_gib": round(model_bytes / 2**30, 3),
                "imports_rss_gib": round(imports / 2**30, 3),
                "peak_rss_gib": round(overall / 2**30, 3),
                "steps": steps,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
