"""Cost of the geometry callback's work on quickstart-shaped deltas, the earlier path vs now, in one process.

SmolLM2-135M's target tensors: ``--layers`` blocks (30 in the model) × the seven projections
q 576×576, k 192×576, v 192×576, o 576×576, gate 1536×576, up 1536×576, down 576×1536.
Measured: :func:`cpt.diagnostics.pair_geometry` (what ``GeometryConflictCallback.measure``
runs at steps t ≥ 2, both deltas nonzero), analysis defaults (rank 32, energy 0.95). Step 1
(θ_{t−1} = θ0) computes only norms (0.1 s) and is not measured here.

Two kinds of deltas:

- ``synthetic`` (default): a rank-8 signal plus i.i.d. noise whose energy puts r_E past the
  signal — a flat spectrum past rank 8, where the randomized solver cannot certify and the
  earlier path ended in the exact Gram eigensolve anyway;
- ``--real BASE STATE``: real fine-tuning deltas, ``STATE − BASE`` of two SmolLM2-135M
  ``model.safetensors`` (e.g. the cached base and a finished quickstart's
  ``runs/quickstart/state``): layer ℓ's delta plays the state delta and layer ℓ+1's (same
  shape) the update, so both spectra are a real full fine-tune's (slow decay past rank 32,
  where the earlier path's randomized solver needed 8–12 iterations to certify).

Paths (module switches of :mod:`cpt.geometry.bases`):

- ``old``: the path before issue 19 item 6's second round — ``method="auto"`` randomized for
  576-wide deltas (``GRAM_AUTO_MAX_SIDE_CPU = 0``), Gram eigensolves one after another
  (``GRAM_SOLVER_THREADS = 1``), small factorizations on the process's threads
  (``SMALL_LINALG_ONE_THREAD = False``), Gram products in float64
  (``GRAM_WORKING_PRECISION = False``);
- ``new``: the defaults (exact Gram path up to 768 wide on the CPU, tensors split over the
  process's threads with nogil eigensolves (:func:`cpt.geometry.bases.geometry_worker_threads`),
  torch on one thread for small factorizations and around the Gram path, float32 Gram
  subspace + float64 Rayleigh–Ritz);
- ``serial`` (``--baseline serial``): ``new`` on one thread (no split of the tensors over
  threads, eigensolves one after another), i.e. ``new`` before its eigensolves released the GIL;
- ``float64`` (``--baseline float64``): ``new`` with the Gram path in float64 throughout, the
  exact answer, to read the float32 subspace's error against.

Old and new alternate ``--repeats`` times in one process, the order flipped every round (the
machine is shared and its load drifts; compare within a round). Printed per run: wall and
process CPU seconds, the 1-minute load average before it, and the new path's largest
differences from the old one (conflicts, SAR, norms). ``--threads 1`` takes thread contention
out of both paths: their CPU seconds are then the work each does.

    python benchmarks/geometry_quickstart_speed.py --layers 30 --repeats 2
    python benchmarks/geometry_quickstart_speed.py --layers 29 --repeats 2 \\
        --real ~/.cache/cpt/models/smollm2-135m-instruct/model.safetensors runs/quickstart/state/model.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpt.geometry.bases as bases  # noqa: E402
from cpt.diagnostics import GeometrySettings, pair_geometry  # noqa: E402

SHAPES = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}

#: Module switches of each path (see the module docstring).
PATHS = {
    "old": {
        "GRAM_AUTO_MAX_SIDE_CPU": 0,
        "GRAM_SOLVER_THREADS": 1,
        "SMALL_LINALG_ONE_THREAD": False,
        "GRAM_WORKING_PRECISION": False,
    },
    "new": {
        "GRAM_AUTO_MAX_SIDE_CPU": 768,
        "GRAM_SOLVER_THREADS": None,
        "SMALL_LINALG_ONE_THREAD": True,
        "GRAM_WORKING_PRECISION": True,
    },
    # new, on one thread: no split of the tensors over threads and the eigensolves one after
    # another — what "new" effectively was before the solves released the GIL (scipy's wrappers
    # held it, so the concurrent pool ran one solve at a time)
    "serial": {
        "GRAM_AUTO_MAX_SIDE_CPU": 768,
        "GRAM_SOLVER_THREADS": 1,
        "SMALL_LINALG_ONE_THREAD": True,
        "GRAM_WORKING_PRECISION": True,
    },
    "float64": {  # new, but the Gram path in float64 throughout: the exact reference for accuracy
        "GRAM_AUTO_MAX_SIDE_CPU": 768,
        "GRAM_SOLVER_THREADS": None,
        "SMALL_LINALG_ONE_THREAD": True,
        "GRAM_WORKING_PRECISION": False,
    },
}


def make_deltas(layers: int, seed: int, signal_rank: int = 8, signal: float = 3e-2, noise: float = 1e-3):
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for layer in range(layers):
        for module, (d_out, d_in) in SHAPES.items():
            left = torch.randn(d_out, signal_rank, generator=generator)
            right = torch.randn(signal_rank, d_in, generator=generator)
            low_rank = signal / (signal_rank * d_in) ** 0.5 * (left @ right)
            deltas[f"model.layers.{layer}.{module}.weight"] = low_rank + noise * torch.randn(
                d_out, d_in, generator=generator
            )
    return deltas


def real_deltas(base: str, state: str, layers: int):
    """``(state deltas, updates)``: layer ℓ's ``STATE − BASE`` and layer ℓ+1's, for ℓ < ``layers``."""
    from safetensors import safe_open

    def delta(layer: int, module: str, base_file, state_file) -> torch.Tensor:
        name = f"model.layers.{layer}.{module}.weight"
        return state_file.get_tensor(name).float() - base_file.get_tensor(name).float()

    first, second = {}, {}
    with safe_open(base, "pt") as base_file, safe_open(state, "pt") as state_file:
        for layer in range(layers):
            for module in SHAPES:
                name = f"model.layers.{layer}.{module}.weight"
                first[name] = delta(layer, module, base_file, state_file)
                second[name] = delta(layer + 1, module, base_file, state_file)
    return first, second


def use_path(path: str) -> None:
    for switch, value in PATHS[path].items():
        setattr(bases, switch, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--baseline", choices=("old", "serial", "float64"), default="old", help="what the new path is timed against"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: the process's count)")
    parser.add_argument("--real", nargs=2, metavar=("BASE", "STATE"), help="two model.safetensors: real deltas")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.real:
        state, update = real_deltas(*args.real, args.layers)
    else:
        state, update = make_deltas(args.layers, 0), make_deltas(args.layers, 1)
    names = list(update)
    settings = GeometrySettings()
    kind = "real" if args.real else "synthetic"
    print(
        f"{kind}: {len(names)} target tensor pairs ({args.layers} layers × 7), torch threads {torch.get_num_threads()}"
    )

    def run(path: str):
        use_path(path)
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        rows = pair_geometry(names, state.__getitem__, update.__getitem__, settings)
        return time.perf_counter() - wall, time.process_time() - cpu, load, rows

    pair_geometry(names[:7], state.__getitem__, update.__getitem__, settings)  # imports, first-call costs
    results = {}
    base = args.baseline
    try:
        for round_index in range(args.repeats):
            order = (base, "new") if round_index % 2 == 0 else ("new", base)
            for path in order:
                results[path] = run(path)
            (old_wall, old_cpu, old_load, old_rows), (new_wall, new_cpu, new_load, new_rows) = (
                results[base],
                results["new"],
            )
            diffs = {
                key: max(abs(old_rows[n][key] - new_rows[n][key]) for n in names if old_rows[n][key] is not None)
                for key in ("geometry_conflict", "sar_a_to_b", "sar_b_to_a", "norm_a", "norm_b")
            }
            ranks_equal = all(
                old_rows[n][key] == new_rows[n][key] for n in names for key in ("rank_a", "rank_b", "union_rank")
            )
            print(
                f"round {round_index + 1} ({' then '.join(order)}): "
                f"{base} {old_wall:.2f} s wall / {old_cpu:.2f} s CPU (load {old_load:.1f}), "
                f"new {new_wall:.2f} s wall / {new_cpu:.2f} s CPU (load {new_load:.1f}), "
                f"wall ratio new/{base} {new_wall / old_wall:.3f}, CPU ratio {new_cpu / old_cpu:.3f}; max |Δ| "
                + ", ".join(f"{key} {value:.1e}" for key, value in diffs.items())
                + f"; ranks equal {ranks_equal}",
                flush=True,
            )
    finally:
        use_path("new")


if __name__ == "__main__":
    main()
