"""DARE (Drop And REscale) as a task-vector sparsifier, in two continual forms (METHOD §3.A).

**Operator** on one target tensor τ with density ρ (the kept fraction, ``1 − p`` for the
paper's drop rate p): an i.i.d. mask ``m ~ Bernoulli(ρ)`` and ``D(τ) = r · (m ⊙ τ)`` with

* ``rescale: inverse`` (default) ``r = 1/ρ`` — the paper's rule, PEFT's
  ``merge_utils.random_pruning``, MergeLM, MergeBench; unbiased, ``E[D(τ)] = τ``;
* ``rescale: l1`` ``r = ‖τ‖₁/‖m⊙τ‖₁`` (``r = 1`` if either norm is < 1e-7) — mergekit's
  ``rescaled_masked_tensor``, what its ``dare_ties``/``dare_linear`` do by default;
* ``rescale: none`` ``r = 1`` — the paper's DropOnly ablation.

``ρ = 1`` is the identity. The operator applies once, to the new task vector only; masks
are never redrawn.

**Continual forms** (two registered strategies):

* ``dare_ta``: ``θ_t = θ_{t−1} + λ D_t(τ_t)`` (λ = 0.3, §3 task arithmetic's value);
* ``dare_ties``: ``M_1 = D_1(τ_1)``; ``M_t = TIES′(M_{t−1}, D_t(τ_t))``; ``θ_t = θ0 + λ M_t``.
  TIES′ is §3 TIES without the top-k trim (DARE replaces it; ``M_{t−1}`` enters untrimmed):
  the elected sign is the sign of ``M_{t−1} + D_t`` (a zero sum elects ``+``), the entries
  of that sign are kept (zeros never are) and averaged (count clamped to ≥ 1) — PEFT's
  ``dare_ties``, whose ``calculate_majority_sign_mask`` and ``disjoint_merge`` are used
  here. ``trim_k`` adds the trim back (MergeLM: DARE, then full TIES).

**Seeding** (cpt choice; every reference draws from the global RNG, so its masks depend on
the device, the tensor order and the sharding): one CPU generator per (seed, task, tensor),
seeded with ``h = (seed·1000003 + t·7919 + crc32(name)) mod 2^63``, and the mask is
``torch.rand(shape, generator=g) < ρ`` drawn on the CPU, then moved. A mask therefore
does not change with a resume, ZeRO-3 gathering, the device or the order of the tensors.

**Which tensors.** DARE sparsifies the target tensors (the recipe's ``targets``, the 2-D
linear weights). Non-target tensors (embeddings, norms, biases, lm_head) take the same
continual rule on the dense ``τ_t``: task arithmetic for ``dare_ta``, TIES′ of the dense
vectors for ``dare_ties`` (a cpt choice: a Bernoulli drop rescaled 5× on a norm's
few hundred entries is noise, and the task-vector sparsifier literature drops the linear
weights).

Stats per target tensor and step: realized ``density`` (``nnz(m)/numel``), ``rescale``
(r), ``norm_task_vector`` (‖τ‖_F), ``norm_sparsified`` (‖D(τ)‖_F) and the generator seed
``mask_seed`` (h); for ``dare_ties`` also ``sign_conflicts`` (both inputs non-zero with
opposite signs) and ``dropped_by_election`` (the non-zero input entries the elected sign
drops, per entry of the tensor).
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge
from pydantic import Field

from cpt.merging.contract import (
    MergeResult,
    MergeStrategy,
    RunningMergeStrategy,
    TensorBatch,
)
from cpt.merging.ties import ties_merge
from cpt.strategies import register_strategy

#: Below this L1 norm mergekit's rescale falls back to r = 1 (``sparsify.py``, ``rescaled_masked_tensor``).
L1_RESCALE_FLOOR = 1e-7


def mask_seed(seed: int, step: int, name: str) -> int:
    """``h = (seed·1000003 + t·7919 + crc32(name)) mod 2^63`` (METHOD §3.A): stable across
    processes and platforms (``crc32``, not Python's salted ``hash``)."""
    return (seed * 1_000_003 + step * 7919 + zlib.crc32(name.encode())) % 2**63


def dare_mask(shape, density: float, seed: int, step: int, name: str) -> torch.Tensor:
    """The Bernoulli(ρ) keep-mask of tensor ``name`` at task ``step``, as bool, on the CPU."""
    generator = torch.Generator("cpu").manual_seed(mask_seed(seed, step, name))
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float32) < density


def dare_sparsify(
    task_vector: torch.Tensor, mask: torch.Tensor, density: float, rescale: str = "inverse"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``D(τ) = r · (m ⊙ τ)`` batched over ``[n, ...]`` (METHOD §3.A): ``(D(τ), r [n])``.

    ``mask`` is ``[n, ...]`` (bool or 0/1). ``density ≥ 1`` returns τ unchanged (r = 1).
    """
    n = task_vector.shape[0]
    if density >= 1:
        return task_vector, torch.ones(n, dtype=task_vector.dtype, device=task_vector.device)
    masked = task_vector * mask.to(task_vector.dtype)
    if rescale == "inverse":
        factor = torch.full((n,), 1.0 / density, dtype=task_vector.dtype, device=task_vector.device)
    elif rescale == "l1":
        before = task_vector.flatten(1).abs().sum(1)
        after = masked.flatten(1).abs().sum(1)
        degenerate = (before < L1_RESCALE_FLOOR) | (after < L1_RESCALE_FLOOR)
        factor = torch.where(degenerate, torch.ones_like(before), before / after.clamp_min(L1_RESCALE_FLOOR))
    elif rescale == "none":
        factor = torch.ones(n, dtype=task_vector.dtype, device=task_vector.device)
    else:
        raise ValueError(f"unknown rescale {rescale!r}: use inverse, l1 or none")
    if rescale == "inverse":  # divide, as PEFT's random_pruning does: bit-identical results
        return masked / density, factor
    return masked * factor.view(n, *([1] * (task_vector.dim() - 1))), factor


def ties_prime(previous: torch.Tensor, sparsified: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TIES′ of METHOD §3.A: sign election on ``previous + sparsified`` (0 elects ``+``) and
    the mean of the agreeing non-zero entries, no trim; batched over ``[n, ...]``.

    Returns the merged vector and per-tensor ``sign_conflicts`` and ``dropped_by_election``.
    """
    stacked = torch.stack([previous, sparsified])
    agree = calculate_majority_sign_mask(stacked, method="total")
    merged = disjoint_merge(stacked, agree)
    # per entry of the tensor (not per non-zero input), so the stat is row-additive in row blocks
    dropped = ((stacked != 0) & ~agree).flatten(2).sum(dim=(0, 2)).float() / previous[0].numel()
    conflict = (previous * sparsified < 0).flatten(1).float().mean(dim=1)
    return merged, {"sign_conflicts": conflict, "dropped_by_election": dropped}


@dataclass
class DareTaParams:
    density: Annotated[float, Field(gt=0, le=1)] = 0.2
    """ρ: the kept fraction of each target tensor's entries, 1 − p for the paper's drop rate p (0.2, p = 0.8)."""
    rescale: Literal["inverse", "l1", "none"] = "inverse"
    """r: ``inverse`` = 1/ρ (paper, PEFT), ``l1`` = ‖τ‖₁/‖m⊙τ‖₁ (mergekit), ``none`` (DropOnly)."""
    scaling: float = 0.3
    """λ (METHOD's ``lam``) in θ_t = θ_{t−1} + λ D_t(τ_t) (0.3, as task arithmetic)."""
    seed: int = 0
    """Mask seed, combined with the task index and the tensor name (give the run's seed)."""


@dataclass
class DareTiesParams:
    density: Annotated[float, Field(gt=0, le=1)] = 0.2
    """ρ: the kept fraction of each target tensor's entries, 1 − p for the paper's drop rate p (0.2, p = 0.8)."""
    rescale: Literal["inverse", "l1", "none"] = "inverse"
    """r: ``inverse`` = 1/ρ (paper, PEFT), ``l1`` = ‖τ‖₁/‖m⊙τ‖₁ (mergekit), ``none`` (DropOnly)."""
    scaling: float = 0.3
    """λ (METHOD's ``lam``) in θ_t = θ0 + λ M_t (0.3, as TIES)."""
    trim_k: Annotated[float, Field(gt=0, le=1)] | None = None
    """Optional TIES top-k trim after DARE (the kept fraction, per tensor, of both vectors;
    MergeLM's variant). None: PEFT's dare_ties, no trim."""
    seed: int = 0
    """Mask seed, combined with the task index and the tensor name (give the run's seed)."""


class _DareMixin:
    """The sparsifier step shared by both forms: ``D_t(τ_t)`` of a batch and its stats."""

    def sparsify(self, batch: TensorBatch) -> tuple[torch.Tensor, list[dict]]:
        p = self.params
        task_vector = batch.task_vector
        n = len(batch.names)
        if not batch.target:
            return task_vector, [{} for _ in range(n)]
        if p.density >= 1:  # the identity: no mask to draw
            norms = task_vector.flatten(1).norm(dim=1)
            return task_vector, [
                {
                    "density": 1.0,
                    "rescale": 1.0,
                    "norm_task_vector": float(norms[i]),
                    "norm_sparsified": float(norms[i]),
                    "mask_seed": mask_seed(p.seed, batch.step, name),
                }
                for i, name in enumerate(batch.names)
            ]
        shape = task_vector.shape[1:]
        mask = torch.stack([dare_mask(shape, p.density, p.seed, batch.step, name) for name in batch.names])
        mask = mask.to(task_vector.device)
        sparsified, factor = dare_sparsify(task_vector, mask, p.density, p.rescale)
        kept = mask.flatten(1).float().mean(dim=1)
        task_norm, sparse_norm = task_vector.flatten(1).norm(dim=1), sparsified.flatten(1).norm(dim=1)
        stats = [
            {
                "density": float(kept[i]),
                "rescale": float(factor[i]),
                "norm_task_vector": float(task_norm[i]),
                "norm_sparsified": float(sparse_norm[i]),
                "mask_seed": mask_seed(p.seed, batch.step, name),
            }
            for i, name in enumerate(batch.names)
        ]
        return sparsified, stats


@register_strategy(
    "dare_ta",
    params=DareTaParams,
    train_from="base",
    description="DARE + task arithmetic: θ_t = θ_{t-1} + λ·D_t(τ_t), D = seeded Bernoulli drop and rescale (METHOD §3.A)",
)
class DareTaskArithmetic(_DareMixin, MergeStrategy):
    def rows_separable(self, target):
        return not target  # the mask (and the l1 rescale) is drawn per whole target tensor

    def merge(self, batch: TensorBatch) -> MergeResult:
        sparsified, stats = self.sparsify(batch)
        update = self.params.scaling * sparsified
        norms = update.flatten(1).norm(dim=1)
        return MergeResult(
            state=batch.state + update,
            stats=[{"norm_update": float(norms[i]), **stats[i]} for i in range(len(batch.names))],
        )


@register_strategy(
    "dare_ties",
    params=DareTiesParams,
    train_from="base",
    description="DARE + TIES: M_t = TIES'(M_{t-1}, D_t(τ_t)) (sign election, disjoint mean, no trim), θ_t = θ0 + λ·M_t (METHOD §3.A)",
)
class DareTies(_DareMixin, RunningMergeStrategy):
    def rows_separable(self, target):
        # TIES′ is element-wise; only the trim (trim_k) and the target mask need whole tensors.
        return not target and self.params.trim_k is None

    def merge(self, batch: TensorBatch) -> MergeResult:
        sparsified, sparse_stats = self.sparsify(batch)
        # RunningMergeStrategy combines M_{t−1} with the task vector it is given: D_t(τ_t)
        result = super().merge(dataclasses.replace(batch, task_vector=sparsified))
        for entry, extra in zip(result.stats, sparse_stats):
            entry.update(extra)
        return result

    def first_stats(self, task_vector):
        zeros = torch.zeros(task_vector.shape[0])
        return {"sign_conflicts": zeros, "dropped_by_election": zeros}

    def combine(self, previous, task_vector):
        if self.params.trim_k is not None:
            merged, conflict = ties_merge(previous, task_vector, self.params.trim_k)
            return merged, {"sign_conflicts": conflict}
        return ties_prime(previous, task_vector)
