"""LiNeS — Layer-increasing Network Scaling, continual form (METHOD §3.C).

A merged task vector is scaled per tensor by the depth of the block it belongs to,

    λ(ℓ) = α + β · ℓ/(L−1)        (ℓ = 0 … L−1, L = num_hidden_layers)

so shallow layers (shared features) keep little of the merge and deep layers more. Tensors
outside the blocks (embeddings, the final norm, lm_head) get ``α`` (LiNeS
``src/eval/eval.py`` L56-97). ℓ is parsed from the tensor name with ``layer_regex``
(default ``\\.layers\\.(\\d+)\\.``; its one group is the block index) — not the reference's
first ``.{i}.`` substring match, which misfires on names with other ``.<int>.`` segments
(MoE experts). ``L < 2`` is an error.

**Continual form** (cpt; no source gives one): the reference multi-task rule is applied to
every task vector seen so far, at each step, with ``S_t = S_{t−1} + τ_t`` kept as pipeline
history:

* ``base: ta`` (default): ``M_t = S_t``, ``α_t = 1/t``, ``θ_t = θ0 + Λ_{α_t,β}(S_t)``;
* ``base: ties``: ``M_t`` is §3 TIES's running vector (``M_1 = τ_1``,
  ``M_t = TIES(M_{t−1}, τ_t)``, per-tensor top-``density`` trim), kept beside ``S_t``;
  ``α_t = (1/t)·‖S_t‖₁/‖M_t‖₁`` with both L1 norms over the target tensors (the reference
  takes the whole model); ``θ_t = θ0 + Λ_{α_t,β}(M_t)``.

At t = 1, ``α_1 = 1``: deep layers get ``(1+β)·τ_1`` (the reference rule for T = 1).
``alpha`` set to a number fixes α at every step. ``‖M_t‖₁`` is needed before any tensor is
written, so ``base: ties`` computes ``M_t`` in a pre-pass (reading ``M_{t−1}`` from the kept
history) and again in the merge: TIES's cost twice, memory one batch.

If the kept S (or M) of a tensor is missing at t ≥ 2, it is recovered from the state as
``(θ_{t−1} − θ0)/λ_{t−1}(ℓ)`` with the carried ``α_{t−1}`` (exact for ``ta``; for ``ties``
S is then approximated by M) and the tensor's stats say so.

**Multi-process runs** (the gather contract of :class:`~cpt.merging.contract.MergeStrategy`):
L comes from the config and λ(ℓ) from the tensor's name, the same on every rank; the
``base: ties`` pre-pass sums ‖S_t‖₁ and ‖M_t‖₁ per rank over its share and adds the ranks'
sums; the summary's L1 norms and layer scales are gathered after the merge. Only the order
of the float64 sums differs from one process.

Recorded per tensor: ``layer`` (−1 outside the blocks), ``scale`` λ(ℓ), ``norm_update``;
per step: ``alpha``, ``beta``, ``layer_scales`` (λ per layer), ``norm_l1_sum`` (‖S_t‖₁) and
``norm_l1_merged`` (‖M_t‖₁) over the target tensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass

from cpt.errors import CptError
from cpt.merging.contract import MergeResult, MergeStrategy, TensorBatch, gather_shares
from cpt.merging.ties import ties_merge
from cpt.strategies import register_strategy

DEFAULT_LAYER_REGEX = r"\.layers\.(\d+)\."


def _one_group_regex(layer_regex: str) -> str:
    try:
        groups = re.compile(layer_regex).groups
    except re.error as exc:
        raise ValueError(f"{layer_regex!r} is not a regular expression: {exc}") from None
    if groups != 1:
        raise ValueError(f"{layer_regex!r} must have exactly one group (the block index), it has {groups}")
    return layer_regex


@dataclass(config=ConfigDict(extra="forbid"))
class LinesParams:
    beta: float = 0.5
    """β: the depth slope, λ(ℓ) = α + β·ℓ/(L−1) (0.5: a cpt choice; the reference tunes it on validation)."""
    alpha: float | Literal["auto"] = "auto"
    """α: ``auto`` = the reference multi-task rule (1/t for ``ta``, (1/t)·‖S_t‖₁/‖M_t‖₁ for ``ties``); a number fixes it."""
    base: Literal["ta", "ties"] = "ta"
    """The running vector scaled: the task-vector sum (``ta``) or §3 TIES's ``M_t`` (``ties``)."""
    density: Annotated[float, Field(gt=0, le=1)] = 0.2
    """TIES's kept fraction per tensor (``base: ties`` only; 0.2 as §3 TIES)."""
    majority_sign: Literal["total", "frequency"] = "total"
    """TIES's sign election (``base: ties`` only)."""
    layer_regex: Annotated[str, AfterValidator(_one_group_regex)] = DEFAULT_LAYER_REGEX
    """Regular expression whose one group is a tensor's block index ℓ (searched in the name)."""
    num_layers: Annotated[int, Field(ge=2)] | None = None
    """L; None = ``num_hidden_layers`` of θ0's config.json."""


def layer_index(name: str, pattern: re.Pattern) -> int | None:
    """The block index ℓ of tensor ``name`` (None outside the blocks)."""
    match = pattern.search(name)
    return int(match.group(1)) if match else None


def lines_scale(layer: int | None, num_layers: int, alpha: float, beta: float) -> float:
    """``λ(ℓ) = α + β·ℓ/(L−1)``; ``α`` outside the blocks (METHOD §3.C)."""
    if num_layers < 2:
        raise ValueError(f"LiNeS needs at least 2 layers, got L = {num_layers}")
    if layer is None:
        return alpha
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer index {layer} outside 0..{num_layers - 1}: check strategy.num_layers / layer_regex")
    return alpha + beta * layer / (num_layers - 1)


def multitask_alpha(step: int, norm_l1_sum: float, norm_l1_merged: float) -> float:
    """The reference multi-task rule ``α = (1/T)·‖Σ τ_i‖₁/‖τ_MTL‖₁`` with T = t (1/t when the norms agree)."""
    if norm_l1_merged == 0:
        return 1.0 / step
    return norm_l1_sum / (step * norm_l1_merged)


def _num_hidden_layers(base_dir: Path) -> int:
    path = Path(base_dir) / "config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    for section in (config, config.get("text_config") or {}):
        if "num_hidden_layers" in section:
            return int(section["num_hidden_layers"])
    raise CptError(f"{path}: no num_hidden_layers; set strategy.num_layers (L) for LiNeS")


@register_strategy(
    "lines",
    params=LinesParams,
    train_from="base",
    description="LiNeS: the running task-vector sum (or TIES vector) scaled per block, λ(ℓ) = α + β·ℓ/(L−1), α = 1/t (METHOD §3.C)",
)
class Lines(MergeStrategy):
    SUM_KEY, MERGED_KEY = "task_sum", "merged"
    rank_split = True

    def __init__(self, params):
        super().__init__(params)
        self._pattern = re.compile(params.layer_regex)

    def history_keys(self, step, scalars):
        return [self.SUM_KEY, self.MERGED_KEY] if self.params.base == "ties" else [self.SUM_KEY]

    def rows_separable(self, target):
        return self.params.base == "ta"  # S_t and λ(ℓ) are element-wise; TIES trims whole tensors

    # ------------------------------------------------------------------ per step
    def begin_step(self, step, batches, scalars):
        p = self.params
        context = getattr(batches, "context", None)
        if p.num_layers is not None:
            self._num_layers = p.num_layers
        elif context is not None:
            self._num_layers = _num_hidden_layers(context.base_dir)
        else:
            raise CptError("strategy.num_layers: unknown without a base model folder; set it")
        if self._num_layers < 2:
            raise CptError(f"strategy.num_layers: LiNeS needs L >= 2 blocks, the model has {self._num_layers}")
        self._previous_alpha = scalars.get("alpha")
        self._norm_sum = self._norm_merged = 0.0
        self._layers: dict[int, float] = {}
        if p.alpha != "auto":
            self._alpha = float(p.alpha)
        elif step == 1 or p.base == "ta":
            self._alpha = 1.0 / step
        else:
            norm_sum, norm_merged = self._ties_norms(step, batches)
            self._alpha = multitask_alpha(step, norm_sum, norm_merged)

    def _ties_norms(self, step: int, batches) -> tuple[float, float]:
        """‖S_t‖₁ and ‖M_t‖₁ over the target tensors, before the merge (``base: ties``; each
        rank's share, the ranks' sums added)."""
        from cpt.merging.batch_io import _History, read_rows

        def share_norms() -> tuple[float, float]:
            history = _History(batches.context.history_dir)
            readers = {key: history.reader(step - 1, key) for key in (self.SUM_KEY, self.MERGED_KEY)}
            norm_sum = norm_merged = 0.0
            for target, names, rows, base, state, _expert, task_vector in batches.iterate():
                if not target:
                    continue
                kept = {
                    key: (
                        torch.stack([read_rows(reader, n, rows).to(task_vector.device, torch.float32) for n in names])
                        if reader is not None and all(n in reader for n in names)
                        else None
                    )
                    for key, reader in readers.items()
                }
                previous_sum, previous_merged, _ = self._previous(names, state - base, kept)
                merged, _ = ties_merge(previous_merged, task_vector, self.params.density, self.params.majority_sign)
                norm_sum += float((previous_sum + task_vector).abs().double().sum())
                norm_merged += float(merged.abs().double().sum())
            for reader in readers.values():
                if reader is not None:
                    reader.release()
            return norm_sum, norm_merged

        parts = gather_shares(batches, share_norms)
        return sum(part[0] for part in parts), sum(part[1] for part in parts)

    def _scales(self, names: list[str], alpha: float) -> list[tuple[int | None, float]]:
        return [
            (layer, lines_scale(layer, self._num_layers, alpha, self.params.beta))
            for layer in (layer_index(name, self._pattern) for name in names)
        ]

    def _previous(self, names, state_delta, kept) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(S_{t−1}, M_{t−1}, recovered)`` of a batch at t ≥ 2."""
        previous_sum = kept.get(self.SUM_KEY)
        previous_merged = kept.get(self.MERGED_KEY) if self.params.base == "ties" else previous_sum
        if previous_sum is not None and previous_merged is not None:
            return previous_sum, previous_merged, False
        if self._previous_alpha is None:
            raise ValueError(
                f"LiNeS history of step t-1 is missing for {names[0]} and no α_(t-1) to recover it from the state"
            )
        scales = torch.tensor(
            [s for _, s in self._scales(names, float(self._previous_alpha))],
            dtype=state_delta.dtype,
            device=state_delta.device,
        ).view(len(names), *([1] * (state_delta.dim() - 1)))
        recovered = state_delta / scales
        return recovered, recovered, True

    def merge(self, batch: TensorBatch) -> MergeResult:
        p = self.params
        task_vector = batch.task_vector
        recovered = False
        if batch.step == 1:
            task_sum, merged = task_vector, task_vector
        else:
            previous_sum, previous_merged, recovered = self._previous(batch.names, batch.state_delta, batch.history)
            task_sum = previous_sum + task_vector
            if p.base == "ties":
                merged, _ = ties_merge(previous_merged, task_vector, p.density, p.majority_sign)
            else:
                merged = task_sum
        scales = self._scales(batch.names, self._alpha)
        factor = torch.tensor([s for _, s in scales], dtype=merged.dtype, device=merged.device)
        new_state = batch.base + factor.view(len(batch.names), *([1] * (merged.dim() - 1))) * merged
        if batch.target:
            self._norm_sum += float(task_sum.abs().double().sum())
            self._norm_merged += float(merged.abs().double().sum())
        for layer, scale in scales:
            if layer is not None:
                self._layers[layer] = scale
        update = (new_state - batch.state).flatten(1).norm(dim=1)
        stats = [
            {
                "norm_update": float(update[i]),
                "layer": -1 if layer is None else layer,
                "scale": scale,
                **({"recovered_from_state": True} if recovered else {}),
            }
            for i, (layer, scale) in enumerate(scales)
        ]
        history = {self.SUM_KEY: task_sum, **({self.MERGED_KEY: merged} if p.base == "ties" else {})}
        return MergeResult(state=new_state, history=history, stats=stats)

    def rank_partials(self):
        return {"norm_sum": self._norm_sum, "norm_merged": self._norm_merged, "layers": self._layers}

    def absorb_rank_partials(self, partials, order):
        self._norm_sum = sum(part["norm_sum"] for part in partials)
        self._norm_merged = sum(part["norm_merged"] for part in partials)
        self._layers = {layer: scale for part in partials for layer, scale in part["layers"].items()}

    def end_step(self, step, scalars):
        scalars["alpha"] = self._alpha
        return {
            "alpha": self._alpha,
            "beta": self.params.beta,
            "num_layers": self._num_layers,
            "layer_scales": {str(layer): scale for layer, scale in sorted(self._layers.items())},
            "norm_l1_sum": self._norm_sum,
            "norm_l1_merged": self._norm_merged,
        }
