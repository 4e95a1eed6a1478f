"""Speed and memory of one continual GCWM step (METHOD §2) on Qwen3-0.6B-shaped deltas.

``--blocks`` transformer blocks, each with the seven target projections (d_out × d_in):
q 2048×1024, k 1024×1024, v 1024×1024, o 1024×2048, gate 3072×1024, up 3072×1024,
down 1024×3072. For every shape the deltas of all blocks are stacked and merged by one
batched :func:`cpt.merging.gcwm.gcwm_continual_step` call (METHOD defaults: rank 16,
energy 0.9, barycenter metric, conflict gate, Adam lr 1e-5, 100 iterations per branch).

- ``--memory current_anchor``: step t = ``--tasks``, active set ``[m_{t−1}, τ_t]``;
- ``--memory all_history``: step t = ``--tasks``, active set ``[τ_1 … τ_t]``.

Values are low-rank plus noise: each delta is a rank-16 signal (entries ~1e-2) whose
right directions mix a pool shared by all tasks with its own, plus i.i.d. noise (std
1e-3), float32. Data generation is excluded from the wall time. Memory: peak extra
process RSS during the merge calls, sampled from /proc every 5 ms (CPU), or the peak
CUDA allocation above the inputs (CUDA).

    python benchmarks/merge_speed.py --device cpu --blocks 1
    python benchmarks/merge_speed.py --device cuda --blocks 28 [--tf32]  # TF32 in the loop product
    python benchmarks/merge_speed.py --device cuda --memory all_history --tasks 5
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpt.merging.gcwm import GCWMParams, gcwm_continual_step

SHAPES = {
    "q_proj": (2048, 1024),
    "k_proj": (1024, 1024),
    "v_proj": (1024, 1024),
    "o_proj": (1024, 2048),
    "gate_proj": (3072, 1024),
    "up_proj": (3072, 1024),
    "down_proj": (1024, 3072),
}
QWEN3_06B_BLOCKS = 28


def make_deltas(count, blocks, d_out, d_in, device, seed, rank=16, signal=1e-2, noise=1e-3):
    """``count`` low-rank-plus-noise deltas ``[blocks, d_out, d_in]`` float32; each signal
    uses half of its right directions from a pool shared by all deltas."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    half = rank // 2
    shared = randn(blocks, rank, d_in)
    out = []
    for i in range(count):
        pick = torch.randperm(rank, generator=torch.Generator().manual_seed(seed + i))[:half]
        rows = torch.cat([shared[:, pick.to(device)], randn(blocks, rank - half, d_in)], 1)
        x = (signal / rank**0.5) * (randn(blocks, d_out, rank) @ rows)
        x.add_(randn(blocks, d_out, d_in), alpha=noise)
        out.append(x)
    return out


class RssSampler:
    """Peak resident set size (bytes) of this process while running, from /proc."""

    def __init__(self, interval=0.005):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--blocks", type=int, default=QWEN3_06B_BLOCKS)
    parser.add_argument("--memory", default="current_anchor", choices=["current_anchor", "all_history"])
    parser.add_argument("--tasks", type=int, default=5, help="step index t (all_history: t active deltas)")
    parser.add_argument("--iters", type=int, default=100, help="Adam iterations per branch (METHOD: 100)")
    parser.add_argument(
        "--tf32", action="store_true", help="CUDA: TF32 for the Adam loop's per-step product only (gcwm loop_tf32)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.tasks < 2:
        parser.error("--tasks must be >= 2 (a continual step with an earlier task)")
    params = GCWMParams(memory=args.memory, iters=args.iters)
    t = args.tasks

    # warm-up (library initialisation, fused-Adam kernel), excluded
    w = make_deltas(2, 2, 64, 48, device, seed=999)
    gcwm_continual_step(2, w[1], w[0], [w[0]], params)
    sync(device)

    total, rows, loop_flops = 0.0, [], 0.0
    peak_extra = 0
    for i, (name, (d_out, d_in)) in enumerate(SHAPES.items()):
        deltas = make_deltas(t + 1, args.blocks, d_out, d_in, device, seed=args.seed * 1000 + 10 * i)
        previous, task_vector, history = deltas[0], deltas[t], deltas[1:t]
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base_alloc = torch.cuda.memory_allocated(device)
        with RssSampler() as rss:
            t0 = time.perf_counter()
            merged, increment, stats = gcwm_continual_step(
                t, task_vector, previous, history, params, loop_tf32=args.tf32
            )
            sync(device)
            dt = time.perf_counter() - t0
        if device.type == "cuda":
            extra = torch.cuda.max_memory_allocated(device) - base_alloc
        else:
            extra = rss.peak - rss.start
        peak_extra = max(peak_extra, extra)
        total += dt
        branches = stats["branch"]
        n_loops = int((branches != 1).sum()) + int((branches != 0).sum())  # Adam solves run
        loop_flops += 2.0 * args.iters * n_loops * d_out * d_in * d_in
        rows.append(
            f"{name:10s} {d_out:5d}x{d_in:<5d} x{args.blocks:<3d} {dt:8.2f} s   "
            f"c {stats['conflict'].mean():.3f}  alpha {stats['alpha'].mean():.3f}  "
            f"union rank {stats['union_rank'].float().mean():.1f}  "
            f"branches plain/rel/both {int((branches == 0).sum())}/{int((branches == 1).sum())}/"
            f"{int((branches == 2).sum())}  extra mem {extra / 2**30:.2f} GiB"
        )
        print(rows[-1], flush=True)
        del deltas, previous, task_vector, history, merged, increment, stats

    n_tensors = args.blocks * len(SHAPES)
    active = 2 if args.memory == "current_anchor" else t
    print(
        f"\ndevice {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"tf32 {bool(args.tf32) if device.type == 'cuda' else 'n/a'}"
    )
    print(
        f"one continual GCWM step ({args.memory}, step t={t}, {active} active deltas, "
        f"{args.iters} Adam iterations per branch) on {n_tensors} tensors: "
        f"{total:.2f} s wall (data generation excluded)"
    )
    print(f"inner-loop products: {loop_flops / 1e12:.1f} TFLOP, {loop_flops / total / 1e9:.0f} GFLOP/s overall")
    if args.blocks != QWEN3_06B_BLOCKS:
        print(f"linear extrapolation to {QWEN3_06B_BLOCKS} blocks: {total * QWEN3_06B_BLOCKS / args.blocks:.1f} s")
    if device.type == "cuda":
        print(
            f"peak CUDA memory above the inputs: {peak_extra / 2**30:.2f} GiB "
            f"(max over shapes; total peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB)"
        )
    else:
        print(
            f"peak extra process RSS during a merge call: {peak_extra / 2**30:.2f} GiB (max over shapes); "
            f"peak process RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
        )
    return total


if __name__ == "__main__":
    main()
