"""Peak host memory of continual merge steps against the size of one model (issue: GCWM).

    python benchmarks/merge_memory.py --model smollm2-135m-instruct --tasks 5 --method gcwm --set iters=5

Writes ``--tasks`` synthetic experts of the model (θ0 + a rank-8 perturbation of every
weight, saved as safetensors), then runs ``cpt merge`` over them with ``--save-steps`` in a
child process whose resident memory is sampled every 10 ms, step by step. The claim to
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


def peak_rss_of(command: list[str]) -> tuple[int, float]:
    """(peak resident bytes of the process tree, wall seconds) of ``command``."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    handle = psutil.Process(process.pid)
    started = time.perf_counter()

    def sample() -> None:
        nonlocal peak
        while process.poll() is None:
            try:
                total = handle.memory_info().rss + sum(child.memory_info().rss for child in handle.children(recursive=True))
            except psutil.Error:
                break
            peak = max(peak, total)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(stderr[-3000:])
    return peak, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="asset name or local HF folder")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--method", default="gcwm")
    parser.add_argument("--set", dest="overrides", action="append", default=["iters=5"])
    args = parser.parse_args()

    from cpt.assets import resolve_model

    base = resolve_model(args.model)
    model_bytes = sum(p.stat().st_size for p in Path(base).glob("*.safetensors"))
    baseline, _ = peak_rss_of([sys.executable, "-c", "import torch, transformers, safetensors, cpt.merging.gcwm"])
    with tempfile.TemporaryDirectory() as scratch:
        experts = make_experts(base, args.tasks, Path(scratch))
        rows = []
        for count in range(1, args.tasks + 1):
            out = Path(scratch) / f"merged{count}"
            command = [sys.executable, "-m", "cpt.cli", "merge", "--method", args.method, base, *map(str, experts[:count]),
                       "--output", str(out)] + [item for pair in args.overrides for item in ("--set", pair)]
            peak, seconds = peak_rss_of(command)
            rows.append({"tasks": count, "peak_rss_gib": peak / 2**30, "above_imports_gib": (peak - baseline) / 2**30,
                         "ratio_to_model": (peak - baseline) / model_bytes, "seconds": seconds})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"model_gib": model_bytes / 2**30, "imports_rss_gib": baseline / 2**30, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
