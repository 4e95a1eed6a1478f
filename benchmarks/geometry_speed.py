"""Speed of the state-relative geometry of one continual step (METHOD §1).

Qwen3-0.6B-shaped deltas: ``--blocks`` transformer blocks, each with the seven target
projections (d_out × d_in): q 2048×1024, k 1024×1024, v 1024×1024, o 1024×2048,
gate 3072×1024, up 3072×1024, down 1024×3072. For every shape, the state delta
``θ_{t−1} − θ0`` and the new update ``Δ_t`` of all blocks are stacked and passed to
:func:`cpt.geometry.state_relative_geometry` in one batched call (analysis defaults:
rank 32, energy 0.95, ε 1e-6).

Values are low-rank plus noise: a rank-16 signal (entries ~1e-2) plus i.i.d. noise
(std 1e-3); the update reuses half of the state's signal directions, so the conflict is
neither 0 nor 1. Data generation is excluded from the wall time.

    python benchmarks/geometry_speed.py --device cpu --blocks 28
    python benchmarks/geometry_speed.py --device cuda --blocks 28
    python benchmarks/geometry_speed.py --blocks 1 --svd-check   # vs torch.linalg.svd
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpt.geometry import ANALYSIS_DEFAULTS, right_basis, state_relative_geometry  # noqa: E402

SHAPES = {
    "q_proj": (2048, 1024),
    "k_proj": (1024, 1024),
    "v_proj": (1024, 1024),
    "o_proj": (1024, 2048),
    "gate_proj": (3072, 1024),
    "up_proj": (3072, 1024),
    "down_proj": (1024, 3072),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def make_pair(blocks, d_out, d_in, dtype, device, seed, signal_rank=16, signal=1e-2, noise=1e-3):
    """(state, update) ``[blocks, d_out, d_in]``: rank-16 signals sharing half their
    row directions, plus independent noise."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    half = signal_rank // 2
    shared = randn(blocks, half, d_in)
    rows_state = torch.cat([shared, randn(blocks, signal_rank - half, d_in)], 1)
    rows_update = torch.cat([shared, randn(blocks, signal_rank - half, d_in)], 1)
    scale = signal / signal_rank**0.5
    state = scale * (randn(blocks, d_out, signal_rank) @ rows_state) + noise * randn(blocks, d_out, d_in)
    update = scale * (randn(blocks, d_out, signal_rank) @ rows_update) + noise * randn(blocks, d_out, d_in)
    return state.to(dtype), update.to(dtype)


def svd_comparison(device, dtype, repeats=3):
    """Best-of-``repeats`` seconds for one 3072×1024 tensor: ``torch.linalg.svd`` vs
    :func:`right_basis` (analysis defaults) on low-rank-plus-noise and on pure noise
    (flat spectrum: the randomized solver gives up early and the exact Gram path runs)."""
    state, _ = make_pair(1, 3072, 1024, dtype, device, seed=777)
    flat = (
        1e-3 * torch.randn(3072, 1024, generator=torch.Generator(device=device).manual_seed(778), device=device)
    ).to(dtype)
    cases = {
        "torch.linalg.svd (low-rank+noise)": lambda: torch.linalg.svd(state[0].float(), full_matrices=False),
        "right_basis (low-rank+noise)": lambda: right_basis(state[0], 32, 0.95),
        "right_basis (flat noise, Gram fallback)": lambda: right_basis(flat, 32, 0.95),
    }
    results = {}
    for name, fn in cases.items():
        fn()
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        results[name] = best
        print(f"{name:42s} {best:7.3f} s", flush=True)
    return results


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--blocks", type=int, default=28)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--svd-check",
        action="store_true",
        help="also time torch.linalg.svd vs right_basis on one 3072x1024 tensor",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")

    # warm-up (library initialisation), excluded
    s, u = make_pair(2, 256, 192, dtype, device, seed=12345)
    state_relative_geometry(s, u, **ANALYSIS_DEFAULTS)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    total = 0.0
    rows = []
    for i, (name, (d_out, d_in)) in enumerate(SHAPES.items()):
        state, update = make_pair(args.blocks, d_out, d_in, dtype, device, seed=args.seed * 100 + i)
        sync(device)
        t0 = time.perf_counter()
        out = state_relative_geometry(state, update, **ANALYSIS_DEFAULTS)
        sync(device)
        dt = time.perf_counter() - t0
        total += dt
        gc = out["geometry_conflict"].float()
        rows.append(
            f"{name:10s} {d_out:5d}x{d_in:<5d} x{args.blocks:<3d} {dt:7.2f} s   "
            f"GC mean {gc.nanmean():.3f}  rank state/update {out['rank_state'].float().mean():.1f}/"
            f"{out['rank_update'].float().mean():.1f}  union {out['union_rank'].float().mean():.1f}"
        )
        print(rows[-1], flush=True)
        del state, update, out

    n_tensors = args.blocks * len(SHAPES)
    print(f"\ndevice {device}, dtype {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"state-relative geometry of {n_tensors} tensor pairs: {total:.2f} s wall (data generation excluded)")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak CUDA memory allocated: {peak:.2f} GiB")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"peak process RSS: {peak:.2f} GiB (includes the generated inputs of one shape)")
    if args.svd_check:
        print()
        svd_comparison(device, dtype)
    return total


if __name__ == "__main__":
    main()
