"""TIES merging, continual form (METHOD §3).

An unscaled running merged vector ``M_t`` is kept as pipeline history (``M_1 = τ_1``);
each step merges it with the new task vector by TIES::

    M_t = TIES(M_{t−1}, τ_t),      θ_t = θ0 + λ M_t

where ``TIES(a, b)`` is, per tensor:

1. **trim** — keep each of ``a`` and ``b``'s top ``density`` fraction of entries by
   magnitude (``k = int(density · numel)`` entries *per tensor*; the batch-level
   original trims over the whole flattened model, which a streamed, per-tensor continual
   merge cannot do — every tensor keeps the same fraction instead);
2. **elect** — the per-entry sign of the sum of the trimmed vectors (``+`` where the sum
   is exactly 0): peft's ``majority_sign_method="total"``;
3. **disjoint mean** — the mean of the trimmed entries whose sign agrees with the
   elected one (0 where none does).

Trimming is the only part written here (batched over a ``[2, n, ...]`` stack: peft's
``magnitude_based_pruning`` works on one whole tensor at a time); the sign election and
the disjoint mean are ``peft.utils.merge_utils.calculate_majority_sign_mask`` and
``disjoint_merge``, whose semantics are exactly METHOD's. The whole step is cross-checked
against ``peft.utils.merge_utils.ties`` (weights 1) in the tests.

Applied to every tensor (target or not), as the original TIES does. If the kept ``M``
of a tensor is missing at t ≥ 2 (history lost), it is recovered from the state,
``M_{t−1} = (θ_{t−1} − θ0)/λ``, and the tensor's stats say so.

``form: fusionbench`` is FusionBench's continual TIES, the OPCM paper's baseline
(``fusion_bench/method/opcm/ties_merging.py``, ``ContinualTiesMergingForCLIP``, with
``fusion_bench/method/ties_merging/ties_merging_utils.py``), a different recursion::

    θ_1 = θ0 + λ τ_1,      θ_t = θ_{t−1} + λ · TIES_fb(θ_{t−1} − θ0, τ_t)

where ``TIES_fb`` works on each vector flattened over the *whole model* (every tensor):

1. **trim** — each vector keeps its entries with ``|x| ≥`` its ``(k+1)``-th largest
   magnitude, ``k = int(density · d)`` (``topk_values_mask``: ``kthvalue(d − k)`` and
   ``>=``, so ``k + 1`` entries without ties);
2. **elect** — ``sign`` of the sum of the trimmed vectors; where it is 0 the sign of the
   sum of all elected signs (the global majority, ``resolve_zero_signs``) — 0 too if that
   sum is 0;
3. **disjoint sum** — the sum of the trimmed entries whose sign matches (``merge_func:
   sum``, FusionBench's default config; where the elected sign is 0 the negative entries
   match, as its ``torch.where(sign > 0, v > 0, v < 0)`` does).

The whole-model thresholds are found exactly in two streamed passes
(:func:`cpt.merging.magnitude.kth_largest_magnitudes`) and the global majority in a third,
before the merge; the merge itself is then element-wise (row blocks allowed) and keeps no
history. ``majority_sign`` must be ``total``. In a multi-process run each rank counts its
share in each of the three passes and the counts are added (the gather contract of
:class:`~cpt.merging.contract.MergeStrategy`): the thresholds and the majority are the
one-process values exactly (histogram counts and sign counts are integers). The running
form is per tensor and splits as it is. FusionBench's config uses λ = 0.5
(``config/method/opcm/ties_merging.yaml``); cpt's default stays METHOD's 0.3 for both forms.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from cpt.merging.contract import MergeResult, RunningMergeStrategy, gather_shares
from cpt.merging.magnitude import kth_largest_magnitudes
from cpt.strategies import register_strategy


@dataclass(config=ConfigDict(extra="forbid"))
class TiesParams:
    density: Annotated[float, Field(gt=0, le=1)] = 0.2
    """k: the fraction of each vector's entries kept (largest magnitudes), per tensor (0.2)."""
    scaling: float = 0.3
    """λ in θ_t = θ0 + λ M_t (0.3)."""
    majority_sign: Literal["total", "frequency"] = "total"
    """Sign election: ``total`` = sign of the sum (METHOD, TIES); ``frequency`` = sign of
    the majority count (peft's alternative, for ablation; ``form: running`` only)."""
    form: Literal["running", "fusionbench"] = "running"
    """``running``: M_t = TIES(M_{t−1}, τ_t), θ_t = θ0 + λ M_t (METHOD §3, per-tensor trim, mean);
    ``fusionbench``: θ_t = θ_{t−1} + λ·TIES(θ_{t−1} − θ0, τ_t) with whole-model trim and disjoint sum."""

    @model_validator(mode="after")
    def _check_cross_field_rules(self) -> TiesParams:
        """The rule tying ``majority_sign`` to ``form`` (single-field ranges live in the annotations)."""
        if self.form == "fusionbench" and self.majority_sign != "total":
            raise ValueError("majority_sign: form fusionbench elects by the sign of the sum; use majority_sign total")
        return self


def trim_top_k(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``int(density·numel)`` magnitudes of each tensor ``stacked[i, j]``.

    ``stacked`` is ``[v, n, ...]`` (v vectors of n tensors); the same rule as peft's
    ``magnitude_based_pruning`` applied to every ``[...]`` tensor on its own.
    """
    if density >= 1:
        return stacked
    flat = stacked.reshape(stacked.shape[0], stacked.shape[1], -1)
    k = int(density * flat.shape[-1])
    if k <= 0:
        return torch.zeros_like(stacked)
    index = flat.abs().topk(k, dim=-1, largest=True).indices
    mask = torch.zeros_like(flat).scatter_(-1, index, 1.0)
    return (flat * mask).reshape(stacked.shape)


def ties_merge(
    previous: torch.Tensor, task_vector: torch.Tensor, density: float, majority_sign: str = "total"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``TIES(M_{t−1}, τ_t)`` batched over ``[n, ...]`` (METHOD §3).

    Returns the merged vector and, per tensor, the fraction of entries where both trimmed
    vectors are non-zero with opposite signs (the sign conflicts TIES resolves).
    """
    trimmed = trim_top_k(torch.stack([previous, task_vector]), density)
    agree = calculate_majority_sign_mask(trimmed, method=majority_sign)
    merged = disjoint_merge(trimmed, agree)
    conflict = (trimmed[0] * trimmed[1] < 0).flatten(1).float().mean(dim=1)
    return merged, conflict


def fusionbench_ties_step(
    previous: torch.Tensor, task_vector: torch.Tensor, thresholds: tuple[float, float], majority: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``TIES_fb(θ_{t−1} − θ0, τ_t)`` on a batch, given the whole-model trim thresholds
    ``(q_prev, q_task)`` and the global majority sign (see the module docstring).

    Returns the merged vector and, per tensor, the fraction of sign conflicts of the trimmed vectors.
    """
    trimmed = torch.stack(
        [previous * (previous.abs() >= thresholds[0]), task_vector * (task_vector.abs() >= thresholds[1])]
    )
    elected = torch.sign(trimmed.sum(dim=0))
    elected = torch.where(elected == 0, torch.full_like(elected, majority), elected)
    keep = torch.where(elected > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * keep).sum(dim=0)
    conflict = (trimmed[0] * trimmed[1] < 0).flatten(1).float().mean(dim=1)
    return merged, conflict


@register_strategy(
    "ties",
    params=TiesParams,
    train_from="base",
    description="continual TIES: M_t = TIES(M_{t-1}, τ_t) (trim, elect sign, disjoint mean), θ_t = θ0 + λ·M_t;"
    " form fusionbench: θ_t = θ_{t-1} + λ·TIES(θ_{t-1}−θ0, τ_t) (METHOD §3)",
)
class Ties(RunningMergeStrategy):
    rank_split = True

    def history_keys(self, step, scalars):
        return [] if self.params.form == "fusionbench" else super().history_keys(step, scalars)

    def rows_separable(self, target):
        return self.params.form == "fusionbench"  # element-wise once the whole-model thresholds are known

    def begin_step(self, step, batches, scalars):
        self._summary = {}
        if self.params.form != "fusionbench" or step == 1:
            return
        density = self.params.density

        def vectors():
            for _target, _names, _rows, base, state, _expert, task_vector in batches.iterate():
                yield state - base, task_vector

        rank = lambda size: int(density * size) + 1
        gather = lambda compute: gather_shares(batches, compute)
        self._thresholds = tuple(kth_largest_magnitudes(vectors, [rank, rank], gather=gather))

        def sign_sum() -> float:  # Σ sign(trimmed sum) over this rank's share: an integer, exact in float64
            total = 0.0
            for previous, task_vector in vectors():
                trimmed = previous * (previous.abs() >= self._thresholds[0]) + task_vector * (
                    task_vector.abs() >= self._thresholds[1]
                )
                total += float(torch.sign(trimmed).double().sum())
            return total

        sign_sum = sum(gather(sign_sum))
        self._majority = float(math.copysign(1.0, sign_sum)) if sign_sum != 0 else 0.0
        self._summary = {
            "threshold_previous": self._thresholds[0],
            "threshold_task": self._thresholds[1],
            "majority_sign": self._majority,
        }

    def merge(self, batch):
        if self.params.form != "fusionbench":
            return super().merge(batch)
        if batch.step == 1:
            merged, conflict = batch.task_vector, torch.zeros(len(batch.names))
        else:
            merged, conflict = fusionbench_ties_step(
                batch.state_delta, batch.task_vector, self._thresholds, self._majority
            )
        update = self.params.scaling * merged
        norms = update.flatten(1).norm(dim=1)
        density = (merged != 0).flatten(1).float().mean(dim=1)
        return MergeResult(
            state=batch.state + update,
            stats=[
                {
                    "norm_update": float(norms[i]),
                    "merged_density": float(density[i]),
                    "sign_conflicts": float(conflict[i]),
                }
                for i in range(len(batch.names))
            ],
        )

    def end_step(self, step, scalars):
        return dict(self._summary)

    def first_stats(self, task_vector):
        nonzero = (task_vector != 0).flatten(1).float().mean(dim=1)
        return {"merged_density": nonzero, "sign_conflicts": torch.zeros(task_vector.shape[0])}

    def combine(self, previous, task_vector):
        merged, conflict = ties_merge(previous, task_vector, self.params.density, self.params.majority_sign)
        return merged, {"merged_density": (merged != 0).flatten(1).float().mean(dim=1), "sign_conflicts": conflict}
