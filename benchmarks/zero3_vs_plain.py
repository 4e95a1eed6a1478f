"""ZeRO-3 against a plain run of the quickstart: same results, and what sharding costs.

    python benchmarks/zero3_vs_plain.py                          # EWC, ZeRO-3 on 1 process
    python benchmarks/zero3_vs_plain.py --strategy gcwm --processes 2

Runs ``recipes/quickstart.yaml`` (SmolLM2-135M-Instruct, three BIG-bench tasks) with the
chosen strategy twice through ``accelerate launch``: plainly, and with
``recipes/accelerate/zero3.yaml``. It then compares the final states (max |Δ| over all
weights), the geometry reports (max |Δ| of every per-tensor field) and the accuracy
matrices, and records both runs' wall time, per-task train/integration time and peak
memory (the main process's, from each run's manifest) in ``benchmarks/RESULTS.md``.
With ``--processes N`` the ZeRO-3 run uses N ranks of batch B/N, the plain one batch B.
Without a GPU it runs DeepSpeed on the CPU (``DS_ACCELERATOR=cpu``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from results import machine, replace_section

REPO = Path(__file__).resolve().parent.parent
GEOMETRY_FIELDS = ("geometry_conflict", "sar_update_to_state", "norm_update", "norm_state")


def launch(recipe: Path, processes: int, zero3: bool) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    if zero3:
        command += ["--config_file", "recipes/accelerate/zero3.yaml"]
    else:
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["cpt/run.py", str(recipe)]
    print("+", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, env=env)
    return time.perf_counter() - started


def state_difference(a: Path, b: Path) -> tuple[float, float]:
    """Max |Δ| over all weights of two states, and ‖Δ‖_F / ‖θ‖_F over the whole state."""
    from cpt.tensors import SafetensorsWeights

    left, right = SafetensorsWeights(a), SafetensorsWeights(b)
    if set(left.names()) != set(right.names()):
        raise SystemExit(f"the states hold different tensors: {sorted(set(left.names()) ^ set(right.names()))[:3]}")
    worst, squared_difference, squared_norm = 0.0, 0.0, 0.0
    for name in left.names():
        difference = left[name].double() - right[name].double()
        worst = max(worst, float(difference.abs().max()))
        squared_difference += float(difference.square().sum())
        squared_norm += float(left[name].double().square().sum())
    return worst, (squared_difference / squared_norm) ** 0.5


def max_geometry_difference(a: Path, b: Path) -> float:
    worst = 0.0
    for file in sorted(a.glob("*.json")):
        left, right = json.loads(file.read_text()), json.loads((b / file.name).read_text())
        for tensor, row in left["per_tensor"].items():
            for field in GEOMETRY_FIELDS:
                x, y = row[field], right["per_tensor"][tensor][field]
                if (x is None) != (y is None):
                    return float("inf")
                if x is not None:
                    worst = max(worst, abs(x - y))
    return worst


def summary(run_dir: Path, wall: float) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    tasks = manifest["tasks"]
    return {
        "wall": wall,
        "train": sum(task.get("train_seconds", 0.0) for task in tasks),
        "integration": sum(task.get("integration_seconds", 0.0) for task in tasks),
        "host_per_task": [task.get("peak_host_rss_gib", float("nan")) for task in tasks],
        "gpu": max((task["peak_gpu_memory_gib"] for task in tasks if "peak_gpu_memory_gib" in task), default=None),
        "acc": json.loads((run_dir / "eval" / "matrix.json").read_text())["metrics"]["acc"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="ewc")
    parser.add_argument("--processes", type=int, default=1, help="ranks of the ZeRO-3 run")
    parser.add_argument("--output", default="runs/zero3-vs-plain", help="where the two runs go")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()

    output = (REPO / args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    batch = base["training"]["per_device_train_batch_size"]
    if batch % args.processes:
        raise SystemExit(f"--processes {args.processes} must divide the quickstart's batch size {batch}")
    runs = {}
    for kind, zero3 in (("plain", False), ("zero3", True)):
        recipe = {
            **base,
            "name": f"{args.strategy}-{kind}",
            "output_dir": str(output),
            "strategy": {"name": args.strategy},
        }
        if zero3:
            recipe["training"] = {**base["training"], "per_device_train_batch_size": batch // args.processes}
        path = output / f"{args.strategy}-{kind}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        wall = launch(path, args.processes if zero3 else 1, zero3)
        runs[kind] = summary(output / recipe["name"], wall)

    plain_dir, zero3_dir = output / f"{args.strategy}-plain", output / f"{args.strategy}-zero3"
    state_diff, state_relative = state_difference(plain_dir / "state", zero3_dir / "state")
    geometry_diff = max_geometry_difference(plain_dir / "geometry", zero3_dir / "geometry")
    same_matrix = (
        json.loads((plain_dir / "eval" / "matrix.json").read_text())["rows"]
        == json.loads((zero3_dir / "eval" / "matrix.json").read_text())["rows"]
    )

    def gib(value):
        return "—" if value is None else f"{value:.2f}"

    rows = "\n".join(
        f"| {label} | {run['acc']:.3f} | {run['wall']:.0f} | {run['train']:.0f} | {run['integration']:.1f} | {' / '.join(gib(value) for value in run['host_per_task'])} | {gib(run['gpu'])} |"
        for label, run in (
            ("plain, 1 process", runs["plain"]),
            (f"ZeRO-3, {args.processes} process(es)", runs["zero3"]),
        )
    )
    command = "python benchmarks/zero3_vs_plain.py " + " ".join(sys.argv[1:])
    body = (
        f"`recipes/quickstart.yaml` with `strategy: {args.strategy}`, plain and under "
        f"`recipes/accelerate/zero3.yaml`.\n\n"
        f"- command: `{command}`\n- machine: {machine()}\n- date: {datetime.date.today().isoformat()}\n\n"
        f"| run | ACC | wall s | train s | integration s | peak host RSS GiB (main process) by the end of each task | peak GPU GiB |\n"
        f"|---|---|---|---|---|---|---|\n{rows}\n\n"
        f"Same results: final state max |Δ| = {state_diff:.2e} (‖Δ‖_F / ‖θ‖_F = {state_relative:.1e}), "
        f"geometry reports max |Δ| = {geometry_diff:.2e}, accuracy matrix {'identical' if same_matrix else 'DIFFERENT'}.\n"
    )
    print(body)
    if not args.no_record:
        replace_section(f"ZeRO-3 vs plain on the quickstart ({args.strategy}, {machine()})", body)


if __name__ == "__main__":
    main()
