"""The merge-strategy contract: a per-tensor-batch rule, tensor in, tensor out (METHOD §2–3).

A data-free merge strategy sees one :class:`TensorBatch` at a time — equal-shape tensors
of θ0, θ_{t−1}, E_t and the task vector τ_t, plus what it kept from step t−1 — and returns
a :class:`MergeResult`: θ_t for the batch, tensors to keep for step t+1, per-tensor
statistics. No files, no HF objects, no globals here: where the tensors come from and
where θ_t goes is :mod:`cpt.merging.batch_io`'s job, the same for every method, so
comparisons are fair.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from cpt.strategies import Strategy

if TYPE_CHECKING:  # pragma: no cover
    from cpt.integration import IntegrationContext
    from cpt.merging.batch_io import BatchSource

T = TypeVar("T")


@dataclass
class TensorBatch:
    """Equal-shape tensors of one kind (target or not), stacked on a leading dimension."""

    names: list[str]
    target: bool
    step: int
    base: torch.Tensor
    """θ0 ``[n, ...]`` float32."""
    state: torch.Tensor
    """θ_{t−1} ``[n, ...]`` (θ0 at t = 1)."""
    expert: torch.Tensor
    """E_t ``[n, ...]``."""
    task_vector: torch.Tensor
    """τ_t = E_t − start ``[n, ...]`` (see the module docstring)."""
    history: dict[str, torch.Tensor | None]
    """The strategy's kept tensors from step t−1, by key (``None`` where absent)."""
    scalars: dict[str, Any]
    """The strategy's carried scalars (read at step t−1's end; update in ``end_step``)."""
    rows: slice | None = None
    """``None`` for whole tensors; for a tensor split into row blocks (one name, only for a
    row-separable rule, see :meth:`MergeStrategy.rows_separable`) the rows this batch holds."""

    @property
    def state_delta(self) -> torch.Tensor:
        """θ_{t−1} − θ0."""
        return self.state - self.base


@dataclass
class MergeResult:
    state: torch.Tensor
    """θ_t for the batch."""
    history: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tensors to keep for step t+1, by key (same leading dimension as the batch)."""
    stats: list[dict[str, Any]] | None = None
    """Per-tensor statistics (one dict per name), saved in integration/<t>_<task>.json."""


class MergeStrategy(Strategy):
    """Base class of data-free merge strategies: a :class:`~cpt.strategies.Strategy` whose
    integration is a per-batch rule; subclasses implement :meth:`merge`.

    Optional overrides: :meth:`history_keys` (which kept tensors step t needs),
    :meth:`plain_sum_weights` (the plain sum METHOD §2.10's ``dev_sum`` compares with),
    :meth:`begin_step` (whole-model quantities before the batches, e.g. norms),
    :meth:`end_step` (scalars to carry, a summary), :meth:`finalize_scale` (a global
    rescale of θ_t − θ0 that needs every tensor first; see OPCM). :meth:`integrate` runs
    the rule over the whole model with :func:`cpt.merging.batch_io.run_merge`.

    **Multi-process runs (the gather contract).** Under DDP or DeepSpeed the batches of a
    step are divided among the ranks (:func:`cpt.merging.batch_io.rank_shares`). A rule
    that is batch-local (none of the three whole-model hooks overridden) splits as it is.
    A strategy with whole-model quantities splits when it sets ``rank_split = True`` and
    keeps two rules, so that every rank ends the step with the one-process values:

    1. in :meth:`begin_step`, ``batches.iterate()`` yields only this rank's share: a
       pre-pass computes this rank's *partial* statistics inside :func:`gather_shares`
       (sums, counts, exact histograms — never an approximation) and reduces the list of
       every rank's partials it returns; what follows from the reduced values runs the same
       on every rank;
    2. what :meth:`merge` accumulates for :meth:`end_step` is sent to every rank after the
       batches (:meth:`rank_partials`) and combined (:meth:`absorb_rank_partials`); every
       rank then calls :meth:`end_step` and :meth:`finalize_scale`, and each rank applies
       the main rank's rescale to the tensors it wrote.

    One process never calls the two partials hooks, and :func:`gather_shares` returns
    ``[compute()]``, so the one-process result is the same bit for bit. ``rank_split = False``
    keeps a strategy on the main rank (say why in its module).
    """

    #: Whether the batches of a step may be divided among ranks: ``None`` decides from the
    #: hooks (batch-local when begin_step, end_step and finalize_scale are not overridden),
    #: ``True`` declares the gather contract above, ``False`` keeps the step on rank 0.
    rank_split: ClassVar[bool | None] = None

    # ---------------------------------------------------------------- hooks
    def history_keys(self, step: int, scalars: dict[str, Any]) -> list[str]:
        return []

    def rows_separable(self, target: bool) -> bool:
        """Whether :meth:`merge` treats each row of a target (or non-target) tensor on its
        own — element-wise rules such as task arithmetic. The pipeline may then hand it a
        tensor larger than one batch in row blocks (:attr:`TensorBatch.rows`), so memory
        stays one batch whatever the embedding size. Per-tensor stats are combined over
        the blocks: ``norm*`` keys as the root of the summed squares, other numbers as the
        row-weighted mean, flags with ``or``. Stateful strategies must accumulate, not
        overwrite, per-name quantities. Default ``False`` (whole tensors only).
        """
        return False

    def plain_sum_weights(self, step: int) -> tuple[float, float] | None:
        """``(w_state, w_task)``: the plain sum ``s = w_state (θ_{t−1} − θ0) + w_task τ_t`` this
        rule's merged delta ``θ_t − θ0`` is compared with (METHOD §2.10, ``dev_sum``; recorded
        by the pipeline for every strategy, see :class:`~cpt.merging.merge_diagnostics.StepDiagnostics`).

        Default ``(1, λ)``, λ the strategy's ``scaling`` parameter when it has one (else 1): the
        continual task-arithmetic step, so ``dev_sum`` says how far the rule moved from plain
        addition (0 for task arithmetic) and the size shows in the effective scale. Override
        when the rule's plain form weighs them otherwise (averaging: ``((t−1)/t, 1/t)``), or
        return ``None`` when the strategy records §2.10 itself (GCWM).
        """
        scaling = getattr(self.params, "scaling", 1.0)
        return (1.0, float(scaling) if isinstance(scaling, (int, float)) else 1.0)

    def begin_step(self, step: int, batches: BatchSource, scalars: dict[str, Any]) -> None:
        """Called before the batches; ``batches.iterate()`` streams them if a pre-pass is needed."""

    @abc.abstractmethod
    def merge(self, batch: TensorBatch) -> MergeResult:
        """θ_t (and what to keep, and per-tensor stats) for one batch."""

    def end_step(self, step: int, scalars: dict[str, Any]) -> dict[str, Any]:
        """Update ``scalars`` in place for step t+1; return a summary for the stats file."""
        return {}

    def finalize_scale(self, step: int, scalars: dict[str, Any]) -> float | None:
        """A factor s applied as θ_t = θ0 + s·(θ_t − θ0) after all batches (None: no rescale)."""
        return None

    def rank_partials(self) -> Any:
        """What this rank's :meth:`merge` calls accumulated for :meth:`end_step`, picklable
        (multi-process runs only; see the gather contract in the class docstring)."""
        return None

    def absorb_rank_partials(self, partials: list[Any], order: list[str]) -> None:
        """Replace this rank's accumulators by the whole step's, from every rank's
        :meth:`rank_partials` (in rank order; each rank merged disjoint tensors). ``order``
        is every tensor name in the one-process merge order, for per-name accumulators
        (see :func:`ordered_union`), so the step's summary lists them as one process does."""

    # ---------------------------------------------------------------- entry point
    def integrate(self, context: IntegrationContext) -> dict[str, Any]:
        from cpt.merging.batch_io import run_merge  # the file side imports this contract

        return run_merge(self, context)


class RunningMergeStrategy(MergeStrategy):
    """Strategies that keep an unscaled running vector M_t and set θ_t = θ0 + λ M_t (TIES, MagMax).

    ``M_1 = τ_1``; for t ≥ 2 ``M_t = combine(M_{t−1}, τ_t)``. M is kept as pipeline history
    under ``merged``; if it is missing for a tensor at t ≥ 2 it is recovered as
    ``(θ_{t−1} − θ0)/λ`` and the stats say so. Subclasses implement :meth:`combine`
    and read ``self.params.scaling`` (λ).
    """

    MERGED_KEY = "merged"

    @abc.abstractmethod
    def combine(
        self, previous: torch.Tensor, task_vector: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(M_t, per-tensor statistics ``{name: [n]}``) from M_{t−1} and τ_t, batched."""

    def first_stats(self, task_vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """The statistics of step 1, where M_1 = τ_1."""
        return {}

    def history_keys(self, step, scalars):
        return [self.MERGED_KEY]

    def merge(self, batch: TensorBatch) -> MergeResult:
        scaling = self.params.scaling
        recovered = False
        if batch.step == 1:
            merged, extra = batch.task_vector, self.first_stats(batch.task_vector)
        else:
            previous = batch.history.get(self.MERGED_KEY)
            if previous is None:
                if scaling == 0:
                    raise ValueError(f"no kept merged vector for {batch.names[0]} and scaling 0: cannot recover it")
                previous, recovered = batch.state_delta / scaling, True
            merged, extra = self.combine(previous, batch.task_vector)
        new_state = batch.base + scaling * merged
        update = (new_state - batch.state).flatten(1).norm(dim=1)
        merged_norm = merged.flatten(1).norm(dim=1)
        stats = [
            {
                "norm_update": float(update[i]),
                "norm_merged": float(merged_norm[i]),
                **{key: float(values[i]) for key, values in extra.items()},
                **({"merged_recovered_from_state": True} if recovered else {}),
            }
            for i in range(len(batch.names))
        ]
        return MergeResult(state=new_state, history={self.MERGED_KEY: merged}, stats=stats)


def combine_row_stats(blocks: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """One tensor's stats from its row blocks' ``(rows, stats)`` (see :meth:`MergeStrategy.rows_separable`)."""
    total_rows = sum(count for count, _ in blocks)
    combined: dict[str, Any] = {}
    for key in dict.fromkeys(key for _, stats in blocks for key in stats):
        values = [(count, stats[key]) for count, stats in blocks if key in stats]
        if all(isinstance(value, bool) for _, value in values):
            combined[key] = any(value for _, value in values)
        elif all(isinstance(value, (int, float)) for _, value in values):
            if key.startswith("norm"):
                combined[key] = math.sqrt(sum(float(value) ** 2 for _, value in values))
            else:
                combined[key] = sum(count * float(value) for count, value in values) / total_rows
        else:
            combined[key] = values[-1][1]
    return combined


def gather_shares(batches: BatchSource, compute: Callable[[], T]) -> list[T]:
    """``compute()`` over this rank's share of the batches, and every rank's result in rank order.

    The pre-pass side of the gather contract (:class:`MergeStrategy`): ``compute`` iterates
    ``batches`` (this rank's share in a multi-process run) and returns partial statistics;
    the caller reduces the list. If ``compute`` raises on any rank, every rank raises here.
    One process (or a ``batches`` without ``gather``, as in unit tests): ``[compute()]``.
    """
    gather = getattr(batches, "gather", None)
    return [compute()] if gather is None else gather(compute)


def ordered_union(parts: list[Mapping[str, Any]], order: list[str]) -> dict[str, Any]:
    """One dict from per-rank dicts with disjoint keys (tensor names), keyed in ``order``
    (names absent from ``order`` after, in rank order)."""
    merged: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            if name in merged:
                raise ValueError(f"{name} was merged on two ranks")
            merged[name] = value
    ordered = {name: merged.pop(name) for name in order if name in merged}
    ordered.update(merged)
    return ordered
