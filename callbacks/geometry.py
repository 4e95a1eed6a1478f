"""``GeometryConflictCallback``: where does the new update conflict with the model state?"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from cpt import ranks
from cpt.diagnostics import GeometrySettings, basis_conflict, pair_geometry, right_bases, summarize
from cpt.errors import CptError
from cpt.geometry import LowRankDelta
from cpt.io import atomic_save_safetensors, atomic_write_json
from cpt.recipe import DEFAULT_TARGETS
from cpt.tensors import (
    ModelWeights,
    SafetensorsWeights,
    compile_targets,
    gather_expert_folder,
    is_target,
    local_model_folder,
    lora_factors,
    read_marker,
)

from ._common import SequencePosition, check_train_from, renamed_keyword, resolve_task


class GeometryConflictCallback(SequencePosition, TrainerCallback):
    """Measures the state-relative geometry conflict of the update a task made (METHOD §1).

    At ``on_train_end``, for every target tensor: ``GC(θ_{t−1} − θ0, Δ_t)``, SAR both ways,
    ``‖Δ_t‖`` and ``‖θ_{t−1} − θ0‖``, where ``Δ_t = E_t − start`` is what training changed
    (``start`` = the weights training began from: θ_{t−1} when experts train from the
    state, θ0 when they train from the base; for LoRA, the adapter's ``scale·B·A``, never
    formed densely). Writes ``<output_dir>/<t>_<task>.json`` (per tensor + aggregates:
    mean, attention vs MLP, per depth, the ``top_k`` most conflicting tensors) and logs
    the aggregates through ``trainer.log`` (TensorBoard/W&B/trackio see them) once the
    callback is bound to its trainer with :meth:`bind_trainer`, otherwise into
    ``state.log_history``.

    One instance serves a whole sequence of tasks: at every ``on_train_begin`` it reads
    the step t from ``state_dir``'s ``cpt_state.json`` marker (one more than the step the
    folder holds; 1 when there is no state yet) and measures against the state in that
    folder (θ0 at t = 1). Put it before :class:`~cpt.callbacks.IntegrationCallback` in
    ``callbacks=[...]``: the state must still be θ_{t−1} when it measures.

    In a multi-process run every rank measures its share of the target tensors (balanced
    by bytes, :func:`cpt.ranks.assign_balanced`) and rank 0 gathers the per-tensor rows
    and writes the same report as one process would.

    With ``keep_updates=True`` each task's update is also kept as its right bases
    (``<output_dir>/bases/<t>_<task>.safetensors``, rank ≤ ``settings.rank``: small) and
    the conflict of Δ_t with every earlier task's update is reported too.

    Usage::

        from cpt.callbacks import GeometryConflictCallback, IntegrationCallback

        geometry = GeometryConflictCallback(base="HuggingFaceTB/SmolLM2-135M", state_dir="state", output_dir="geometry")
        for name, dataset in tasks.items():
            trainer = SFTTrainer(model, SFTConfig(output_dir=name, run_name=name), train_dataset=dataset,
                                 callbacks=[geometry, IntegrationCallback("sequential", base=..., state_dir="state")])
            geometry.bind_trainer(trainer)  # the aggregates go through trainer.log
            trainer.train()                 # geometry/<t>_<name>.json

    Args:
        base: θ0, a local HF folder or a hub id (a cached snapshot of its ``*.json`` and
            ``*.safetensors`` files is used; fetched once if online).
        output_dir: where ``<t>_<task>.json`` (and ``bases/``) are written.
        state_dir: the state folder: θ_{t−1} while task t trains (see above). None: the
            previous state is θ0 and t = 1 unless ``step`` says otherwise.
        train_from: ``"state"`` when experts train from θ_{t−1} (sequential, replay, EWC),
            ``"base"`` when they train from θ0 (merge strategies): Δ_t is measured from it.
        targets: regexes of the tensors to measure (default ``cpt.recipe.DEFAULT_TARGETS``).
        settings: rank, energy and numerical floors of the bases (METHOD §1).
        keep_updates: also compare Δ_t with every earlier task's kept update.
        top_k: how many of the most conflicting tensors the report lists.
        device: where the math runs (default: CUDA when available).
        expert_dir: an HF folder holding E_t, read instead of the live model. Under
            DeepSpeed ZeRO-3, when unset, the callback gathers one itself (all ranks take part).
        step: override the step read from the marker (then use one instance per task).
        task_name: the task's name in file names and the report; default the trainer's
            ``args.run_name`` when set, else ``task<t>``.
        previous_state_dir: θ_{t−1} when it is not in ``state_dir``.
        base_dir: deprecated name of ``base`` (a local folder). update_from: deprecated
            name of ``train_from``.

    Subclass hooks: :meth:`select_targets` (which tensors), :meth:`measure` (what is
    computed per tensor), :meth:`aggregate` (the summary), :meth:`write` (where it goes),
    :meth:`log_metrics` (what is logged).
    """

    def __init__(
        self,
        *,
        base: str | Path | None = None,
        output_dir: str | Path,
        state_dir: str | Path | None = None,
        train_from: str | None = None,
        targets: list[str] | None = None,
        settings: GeometrySettings = GeometrySettings(),
        keep_updates: bool = False,
        top_k: int = 10,
        device: str | torch.device | None = None,
        expert_dir: str | Path | None = None,
        step: int | None = None,
        task_name: str | None = None,
        previous_state_dir: str | Path | None = None,
        base_dir: str | Path | None = None,
        update_from: str | None = None,
    ):
        name = type(self).__name__
        base = renamed_keyword(name, "base_dir", "base", base_dir, base)
        if base is None:
            raise CptError(f"{name}: pass base= (θ0: a local HF folder or a hub id)")
        self.base = base
        self._base_dir = Path(base) if base_dir is not None else None  # the old name took a local folder as is
        self.state_dir = Path(state_dir) if state_dir else None
        self.output_dir = Path(output_dir)
        self.train_from = check_train_from(
            name, renamed_keyword(name, "update_from", "train_from", update_from, train_from) or "state"
        )
        self.targets = compile_targets(targets or DEFAULT_TARGETS)
        self.settings = settings
        self.keep_updates = keep_updates
        self.top_k = top_k
        self.device = device
        #: An HF folder holding E_t (read lazily instead of the live model). Under ZeRO-3,
        #: when unset, the callback writes one itself (all ranks take part in the gathers).
        self.expert_dir = Path(expert_dir) if expert_dir else None
        self._init_position(step, task_name, previous_state_dir)
        self._marker_at_begin: dict | None = None
        self.trainer = None
        self.report: dict[str, Any] | None = None
        #: θ_{t−1} = θ0 for the task being measured (step 1): the conflicts are undefined, so
        #: :meth:`measure` computes no bases (only the norms; METHOD §1).
        self._state_is_base = False

    @property
    def base_dir(self) -> Path:
        """θ0's local folder (a hub id is resolved to its cached snapshot on first use)."""
        if self._base_dir is None:
            self._base_dir = local_model_folder(self.base, field=f"{type(self).__name__}: base")
        return self._base_dir

    @property
    def update_from(self) -> str:
        """Deprecated name of :attr:`train_from`."""
        return self.train_from

    # ------------------------------------------------------------------ hooks
    def bind_trainer(self, trainer) -> None:
        """Log through ``trainer.log`` so the trainer's reporters receive the aggregates."""
        self.trainer = trainer

    def select_targets(self, names: list[str], shapes: dict[str, torch.Size]) -> list[str]:
        return [name for name in names if len(shapes[name]) == 2 and is_target(name, self.targets)]

    def measure(self, names: list[str], state_delta, update, group_key=None) -> dict[str, dict]:
        """Per-tensor values; ``state_delta(name)`` and ``update(name)`` load one delta."""
        per_tensor = pair_geometry(
            names, state_delta, update, self.settings, self._device(), group_key, zero_a=self._state_is_base
        )
        return {
            name: {
                "geometry_conflict": row["geometry_conflict"],
                "sar_state_to_update": row["sar_a_to_b"],
                "sar_update_to_state": row["sar_b_to_a"],
                "norm_update": row["norm_b"],
                "norm_state": row["norm_a"],
                "rank_state": row["rank_a"],
                "rank_update": row["rank_b"],
                "union_rank": row["union_rank"],
            }
            for name, row in per_tensor.items()
        }

    def aggregate(self, per_tensor: dict[str, dict]) -> dict[str, Any]:
        return {
            "geometry_conflict": summarize(per_tensor, "geometry_conflict", self.top_k),
            "sar_update_to_state": summarize(per_tensor, "sar_update_to_state", self.top_k),
            "norm_update": summarize(per_tensor, "norm_update", self.top_k),
        }

    def write(self, report: dict[str, Any]) -> Path:
        path = self.output_dir / f"{self.step}_{self.task_name}.json"
        atomic_write_json(path, report)
        return path

    def log_metrics(self, report: dict[str, Any]) -> dict[str, float]:
        aggregates = report["aggregates"]
        metrics = {
            "geometry/conflict_mean": aggregates["geometry_conflict"]["mean"],
            "geometry/sar_update_to_state_mean": aggregates["sar_update_to_state"]["mean"],
            "geometry/norm_update_mean": aggregates["norm_update"]["mean"],
        }
        for family, value in aggregates["geometry_conflict"]["by_family"].items():
            metrics[f"geometry/conflict_{family}"] = value
        for earlier, summary in report.get("earlier_updates", {}).items():
            metrics[f"geometry/conflict_with_{earlier}"] = summary["mean_geometry_conflict"]
        return {key: value for key, value in metrics.items() if value is not None}

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        self._start_task(args)
        if state.is_world_process_zero:
            self.base_dir  # a hub id that cannot be fetched fails now, not after training  # noqa: B018

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        if self._position is None:  # on_train_begin was not called (e.g. a hand-driven callback)
            self._start_task(args)
        try:
            expert_dir, temporary = self.expert_dir, False
            if expert_dir is None:
                expert_dir = gather_expert_folder(model, self.output_dir / f".expert-{self.step}")  # every rank
                temporary = expert_dir is not None
            try:
                # In a multi-process run every rank measures its share of the tensors (rank 0 gathers
                # and writes); the check runs on every rank, so all raise together, before any collective.
                if ranks.world()[1] > 1:  # an expert folder rank 0 writes (ZeRO-3) is complete once all are here
                    ranks.barrier()
                if state.is_world_process_zero or ranks.world()[1] > 1:
                    self._check_state_unchanged()
                    self._measure_and_report(state, model, expert_dir)
            finally:
                if temporary:
                    ranks.barrier()  # every rank has read the gathered expert
                    if state.is_world_process_zero:
                        shutil.rmtree(expert_dir, ignore_errors=True)
        finally:
            self._position = None  # the next task reads the marker again

    def _start_task(self, args) -> None:
        self._position = resolve_task(args, state_dir=self.state_dir, **self._overrides)
        self.step, self.task_name = self._position.step, self._position.task_name
        self.previous_state_dir = self._position.previous_state_dir
        self._marker_at_begin = read_marker(self.state_dir) if self.state_dir is not None else None

    def _check_state_unchanged(self) -> None:
        if (
            self.state_dir is not None
            and self.previous_state_dir == self.state_dir
            and read_marker(self.state_dir) != self._marker_at_begin
        ):
            raise CptError(
                f"{type(self).__name__}: {self.state_dir} changed while task {self.step} trained (an "
                "IntegrationCallback ran first?); put GeometryConflictCallback before IntegrationCallback "
                "in callbacks=[...]"
            )

    def _measure_and_report(self, state, model, expert_dir: Path | None) -> None:
        started = time.perf_counter()
        base = SafetensorsWeights(self.base_dir)
        previous_dir = self.previous_state_dir
        previous = (
            SafetensorsWeights(previous_dir) if previous_dir and (previous_dir / "config.json").exists() else base
        )
        start = previous if self.train_from == "state" else base
        if expert_dir is not None:
            factors, expert = {}, SafetensorsWeights(expert_dir)
        else:
            factors = lora_factors(model)
            expert = ModelWeights(model)  # references; only read when the run is not LoRA
        names = base.names()
        shapes = {name: base.shape(name) for name in names}
        targets = self.select_targets(names, shapes)
        self._state_is_base = previous is base

        def state_delta(name: str) -> torch.Tensor:
            if previous is base:
                return torch.zeros(shapes[name], dtype=torch.float32)
            return previous.get(name).float() - base.get(name).float()

        def update(name: str):
            if name in factors:
                lora_b, lora_a, scale = factors[name]
                return LowRankDelta(lora_b.detach().float().cpu(), lora_a.detach().float().cpu(), scale)
            if factors:  # a LoRA run: tensors without an adapter did not change
                return torch.zeros(shapes[name], dtype=torch.float32)
            return expert[name].detach().float().cpu() - start.get(name).float()

        def group_key(name: str) -> tuple[tuple, int]:
            shape = tuple(shapes[name])
            if name in factors:
                lora_b, lora_a, _ = factors[name]
                return (shape, tuple(lora_b.shape)), 4 * math.prod(shape)
            return (shape, "dense"), 4 * math.prod(shape)

        rank, world_size = ranks.world()
        if world_size > 1:
            per_tensor, current_bases = self._measure_share(targets, state_delta, update, group_key, shapes, factors)
            if rank != 0:
                return
        else:
            per_tensor, current_bases = self.measure(targets, state_delta, update, group_key), None
        report: dict[str, Any] = {
            "step": self.step,
            "task": self.task_name,
            "update_from": self.train_from,  # the report's key keeps its name (run directories stay comparable)
            "settings": dataclasses.asdict(self.settings),
            "num_tensors": len(per_tensor),
            "aggregates": self.aggregate(per_tensor),
            "per_tensor": per_tensor,
        }
        if self.keep_updates:
            report["earlier_updates"] = self._compare_with_earlier(targets, update, group_key, current_bases)
        report["seconds"] = round(time.perf_counter() - started, 3)
        self.write(report)
        self.report = report
        metrics = self.log_metrics(report)
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    def _measure_share(
        self, targets: list[str], state_delta, update, group_key, shapes, factors
    ) -> tuple[dict[str, dict], dict | None]:
        """A collective: this rank measures its share of ``targets`` (balanced by bytes,
        :func:`cpt.ranks.assign_balanced`; the same on every rank) and the rows (and, with
        ``keep_updates``, the right bases) of every rank are gathered, in ``targets``' order.

        The per-tensor math does not depend on which tensors share a batch, so the report
        is the one-process report. A rank that fails makes every rank raise.
        """
        rank, world_size = ranks.world()

        def measured_bytes(name: str) -> int:
            if name in factors:  # LoRA: the factors are what is decomposed
                lora_b, lora_a, _ = factors[name]
                return 4 * (lora_b.numel() + lora_a.numel())
            return 4 * math.prod(shapes[name])

        sizes = [measured_bytes(name) for name in targets]
        owners = ranks.assign_balanced(sizes, world_size)
        mine = [name for name, owner in zip(targets, owners, strict=True) if owner == rank]
        error, result = None, None
        try:
            started = time.perf_counter()
            rows = self.measure(mine, state_delta, update, group_key) if mine else {}
            bases = (
                right_bases(mine, update, self.settings, self._device(), group_key)
                if self.keep_updates and mine
                else {}
            )
            share = {
                "tensors": len(mine),
                "bytes": sum(size for size, owner in zip(sizes, owners, strict=True) if owner == rank),
                "seconds": round(time.perf_counter() - started, 3),
            }
            result = (rows, {name: (v.cpu(), s.cpu()) for name, (v, s) in bases.items()}, share)
        except BaseException as exc:  # noqa: BLE001 - every rank must learn of it before anyone raises
            error = exc
        gathered = ranks.all_gather((None if error is None else f"{type(error).__name__}: {error}", result))
        ranks.raise_if_any_failed(gathered, error, f"geometry of task {self.step}")
        per_tensor, current = {}, {}
        for _, (rows, bases, _) in gathered:
            per_tensor.update(rows)
            current.update(bases)
        if rank == 0:
            ranks.log(ranks.describe_split(f"geometry of task {self.step}", [share for _, (_, _, share) in gathered]))
        return {name: per_tensor[name] for name in targets}, (current if self.keep_updates else None)

    def _compare_with_earlier(self, targets: list[str], update, group_key, current=None) -> dict[str, Any]:
        folder = self.output_dir / "bases"
        if current is None:
            current = right_bases(targets, update, self.settings, self._device(), group_key)
        current = {name: current[name] for name in targets if name in current}
        comparisons = {}
        for file in (
            sorted(folder.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[0])) if folder.exists() else []
        ):
            earlier_step = int(file.stem.split("_")[0])
            if earlier_step >= self.step:
                continue
            stored = load_file(file)
            per_tensor = {
                name: basis_conflict((stored[f"{name}.V"], stored[f"{name}.S"]), current[name], self.settings)
                for name in targets
                if f"{name}.V" in stored
            }
            defined = [value for value in per_tensor.values() if value is not None]
            comparisons[file.stem] = {
                "mean_geometry_conflict": sum(defined) / len(defined) if defined else None,
                "per_tensor": per_tensor,
            }
        tensors = {}
        for name, (v, s) in current.items():
            tensors[f"{name}.V"] = v.contiguous()
            tensors[f"{name}.S"] = s.contiguous()
        atomic_save_safetensors(tensors, folder / f"{self.step}_{self.task_name}.safetensors")
        return comparisons

    def _device(self):
        if self.device is not None:
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"
