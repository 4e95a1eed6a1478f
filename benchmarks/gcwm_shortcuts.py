"""GCWM time per continual step with and without the exact shortcuts (issue 19 item 6).

SmolLM2-135M-shaped task vectors: ``--blocks`` transformer blocks, each with the seven
target projections (d_out × d_in) q 576×576, k 192×576, v 192×576, o 576×576,
gate 1536×576, up 1536×576, down 576×1536; for every shape the blocks are stacked and
merged by one batched :func:`cpt.merging.gcwm.gcwm_continual_step` call (METHOD §2
defaults). Values: low-rank plus noise, float32 (``merge_speed.make_deltas``); data
generation is excluded from the wall time.

Cases (each timed with ``exact_shortcuts=True`` — the default — and ``False``, the long
path every run took before):

- ``step 1``: ``[τ_1]`` (either memory mode): the merge is τ_1, no solve should run;
- ``window of 1``: ``all_history``, ``memory_size 1``, step 3: again one active vector;
- ``step 2``: ``current_anchor`` ``[m_1, τ_2]``: nothing is known exactly, both paths do
  the same work (checks the shortcut tests cost nothing).

The maximum relative difference between the two paths' merged deltas is printed too.

    python benchmarks/gcwm_shortcuts.py --blocks 1
    python benchmarks/gcwm_shortcuts.py --shapes q_proj k_proj --one-active-only  # a short run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_speed import make_deltas

from cpt.merging.gcwm import GCWMParams, gcwm_continual_step

SMOLLM2_SHAPES = {
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


def time_case(step, task_vector, previous, history, params, exact_shortcuts):
    start = time.perf_counter()
    merged, _, _ = gcwm_continual_step(step, task_vector, previous, history, params, exact_shortcuts=exact_shortcuts)
    return time.perf_counter() - start, merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=list(SMOLLM2_SHAPES),
        default=list(SMOLLM2_SHAPES),
        help="projections to time (default: all seven)",
    )
    parser.add_argument(
        "--one-active-only", action="store_true", help="time only the cases with one active vector (skip step 2)"
    )
    args = parser.parse_args()
    cases = {
        "step 1": (1, GCWMParams()),
        "window of 1 (all_history, memory_size 1, step 3)": (3, GCWMParams(memory="all_history", memory_size=1)),
        "step 2 (current_anchor, 2 active)": (2, GCWMParams()),
    }
    if args.one_active_only:
        cases.pop("step 2 (current_anchor, 2 active)")
    totals = {(case, flag): 0.0 for case in cases for flag in (True, False)}
    worst = dict.fromkeys(cases, 0.0)
    for name in args.shapes:
        d_out, d_in = SMOLLM2_SHAPES[name]
        previous, task_vector = make_deltas(2, args.blocks, d_out, d_in, "cpu", args.seed)
        for case, (step, params) in cases.items():
            prev = None if step == 1 else previous
            merged = {}
            for flag in (False, True):
                seconds, merged[flag] = time_case(step, task_vector, prev, [], params, flag)
                totals[(case, flag)] += seconds
                print(f"{name:10s} {case:50s} shortcuts={flag!s:5s} {seconds:8.3f} s", flush=True)
            diff = float((merged[True] - merged[False]).norm() / merged[False].norm())
            worst[case] = max(worst[case], diff)
    print(f"\n{args.blocks} block(s), torch {torch.__version__}, {torch.get_num_threads()} threads")
    for case in cases:
        before, after = totals[(case, False)], totals[(case, True)]
        print(
            f"{case:50s} long path {before:8.2f} s   shortcuts {after:8.2f} s   "
            f"({before / max(after, 1e-9):.0f}×)   max rel. difference {worst[case]:.1e}"
        )


if __name__ == "__main__":
    main()
