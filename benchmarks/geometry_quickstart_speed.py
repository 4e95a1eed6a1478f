"""Cost of the geometry callback's work on quickstart-shaped deltas, old path vs new, in one process.

SmolLM2-135M's target tensors: ``--layers`` blocks (30 in the model) × the seven projections
q 576×576, k 192×576, v 192×576, o 576×576, gate 1536×576, up 1536×576, down 576×1536.
Deltas are full (no LoRA): a rank-8 signal plus i.i.d. noise whose energy puts r_E past
the signal (as a full fine-tune's update does), so the needed pairs reach into the flat noise
bulk, the randomized solver cannot certify them and the exact Gram path answers.

Measured per configuration, with :func:`cpt.diagnostics.pair_geometry` (what
``GeometryConflictCallback.measure`` runs), analysis defaults (rank 32, energy 0.95):

- ``step 1``: state θ_{t−1} = θ0 (zero state delta) — old: the full computation;
  new: ``zero_a=True`` (no bases, no Bures; only the norms);
- ``step 2``: both deltas nonzero — old: full ``torch.linalg.eigh`` in the Gram path
  (``GRAM_SUBSET_EIGH = False``); new: top-k eigenpairs only (``GRAM_SUBSET_EIGH = True``).

Old and new alternate ``--repeats`` times in one process (the machine is shared and its load
drifts; the ratio of the two within a round is what to read). The new path's conflicts are
checked against the old path's (max absolute difference printed).

    python benchmarks/geometry_quickstart_speed.py --layers 30 --repeats 2
"""

from __future__ import annotations

import argparse
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


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    state, update = make_deltas(args.layers, 0), make_deltas(args.layers, 1)
    names = list(update)
    zeros = {name: torch.zeros_like(value) for name, value in update.items()}
    settings = GeometrySettings()

    def run(step: int, new: bool):
        bases.GRAM_SUBSET_EIGH = new
        first = zeros if step == 1 else state
        return pair_geometry(names, first.__getitem__, update.__getitem__, settings, zero_a=new and step == 1)

    print(f"{len(names)} target tensors ({args.layers} layers × 7), torch threads {torch.get_num_threads()}")
    for round_index in range(args.repeats):
        for step in (1, 2):
            old_seconds, old_rows = timed(run, step, new=False)
            new_seconds, new_rows = timed(run, step, new=True)
            diffs = [
                abs(old_rows[n]["geometry_conflict"] - new_rows[n]["geometry_conflict"])
                for n in names
                if old_rows[n]["geometry_conflict"] is not None
            ]
            conflict_check = f"max |ΔGC| {max(diffs):.2e}" if diffs else "conflicts undefined (step 1)"
            print(
                f"round {round_index + 1} step {step}: old {old_seconds:.2f} s, new {new_seconds:.2f} s, "
                f"ratio new/old {new_seconds / old_seconds:.3f}; {conflict_check}"
            )
    bases.GRAM_SUBSET_EIGH = True


if __name__ == "__main__":
    main()
