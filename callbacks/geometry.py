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

from cpt.diagnostics import GeometrySettings, basis_conflict, pair_geometry, right_bases, summarize
from cpt.geometry import LowRankDelta
from cpt.io import atomic_save_safetensors, atomic_write_json
from cpt.recipe import DEFAULT_TARGETS
from cpt.tensors import ModelWeights, SafetensorsWeights, compile_targets, is_target, is_zero3, lora_factors, save_model_folder


class GeometryConflictCallback(TrainerCallback):
    """Measures the state-relative geometry conflict of the update a task made (METHOD §1).

    At ``on_train_end``, for every target tensor: ``GC(θ_{t−1} − θ0, Δ_t)``, SAR both ways,
    ``‖Δ_t‖`` and ``‖θ_{t−1} − θ0‖``, where ``Δ_t = E_t − start`` is what training changed
    (``start`` = the weights training began from: θ_{t−1} when experts train from the
    state, θ0 when they train from the base; for LoRA, the adapter's ``scale·B·A``, never
    formed densely). Writes ``<output_dir>/<t>_<task>.json`` (per tensor + aggregates:
    mean, attention vs MLP, per depth, the ``top_k`` most conflicting tensors) and logs
    the aggregates through the trainer's logging (TensorBoard/W&B/trackio see them) when
    the callback is bound to a trainer (``CptSFTTrainer`` binds it; with a plain
    ``SFTTrainer`` call ``callback.bind_trainer(trainer)``), otherwise into
    ``state.log_history``.

    With ``keep_updates=True`` each task's update is also kept as its right bases
    (``<output_dir>/bases/<t>_<task>.safetensors``, rank ≤ ``settings.rank``: small) and
    the conflict of Δ_t with every earlier task's update is reported too.

    Subclass hooks: :meth:`select_targets` (which tensors), :meth:`measure` (what is
    computed per tensor), :meth:`aggregate` (the summary), :meth:`write` (where it goes),
    :meth:`log_metrics` (what is logged).
    """

    def __init__(
        self,
        *,
        base_dir: str | Path,
        output_dir: str | Path,
        step: int = 1,
        task_name: str = "task",
        state_dir: str | Path | None = None,
        update_from: str = "state",
        targets: list[str] | None = None,
        settings: GeometrySettings = GeometrySettings(),
        keep_updates: bool = False,
        top_k: int = 10,
        device: str | torch.device | None = None,
        expert_dir: str | Path | None = None,
    ):
        if update_from not in ("state", "base"):
            raise ValueError("update_from must be 'state' or 'base'")
        self.base_dir = Path(base_dir)
        self.state_dir = Path(state_dir) if state_dir else None
        self.output_dir = Path(output_dir)
        self.step = step
        self.task_name = task_name
        self.update_from = update_from
        self.targets = compile_targets(targets or DEFAULT_TARGETS)
        self.settings = settings
        self.keep_updates = keep_updates
        self.top_k = top_k
        self.device = device
        #: An HF folder holding E_t (read lazily instead of the live model). Under ZeRO-3,
        #: when unset, the callback writes one itself (all ranks take part in the gathers).
        self.expert_dir = Path(expert_dir) if expert_dir else None
        self.trainer = None
        self.report: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hooks
    def bind_trainer(self, trainer) -> None:
        """Log through ``trainer.log`` so the trainer's reporters receive the aggregates."""
        self.trainer = trainer

    def select_targets(self, names: list[str], shapes: dict[str, torch.Size]) -> list[str]:
        return [name for name in names if len(shapes[name]) == 2 and is_target(name, self.targets)]

    def measure(self, names: list[str], state_delta, update, group_key=None) -> dict[str, dict]:
        """Per-tensor values; ``state_delta(name)`` and ``update(name)`` load one delta."""
        per_tensor = pair_geometry(names, state_delta, update, self.settings, self._device(), group_key)
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

    # ------------------------------------------------------------------ event
    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        expert_dir, temporary = self.expert_dir, False
        if expert_dir is None and is_zero3(model):
            expert_dir, temporary = self.output_dir / f".expert-{self.step}", True
            save_model_folder(model, None, expert_dir)  # a collective: every rank gathers
        if not state.is_world_process_zero:
            return
        try:
            self._measure_and_report(state, model, expert_dir)
        finally:
            if temporary:
                shutil.rmtree(expert_dir, ignore_errors=True)

    def _measure_and_report(self, state, model, expert_dir: Path | None) -> None:
        started = time.perf_counter()
        base = SafetensorsWeights(self.base_dir)
        previous = SafetensorsWeights(self.state_dir) if self.state_dir and (self.state_dir / "config.json").exists() else base
        start = previous if self.update_from == "state" else base
        if expert_dir is not None:
            factors, expert = {}, SafetensorsWeights(expert_dir)
        else:
            factors = lora_factors(model)
            expert = ModelWeights(model)  # references; only read when the run is not LoRA
        names = base.names()
        shapes = {name: base.shape(name) for name in names}
        targets = self.select_targets(names, shapes)

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

        per_tensor = self.measure(targets, state_delta, update, group_key)
        report: dict[str, Any] = {
            "step": self.step,
            "task": self.task_name,
            "update_from": self.update_from,
            "settings": dataclasses.asdict(self.settings),
            "num_tensors": len(per_tensor),
            "aggregates": self.aggregate(per_tensor),
            "per_tensor": per_tensor,
        }
        if self.keep_updates:
            report["earlier_updates"] = self._compare_with_earlier(targets, update, group_key)
        report["seconds"] = round(time.perf_counter() - started, 3)
        self.write(report)
        self.report = report
        metrics = self.log_metrics(report)
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    def _compare_with_earlier(self, targets: list[str], update, group_key) -> dict[str, Any]:
        folder = self.output_dir / "bases"
        current = right_bases(targets, update, self.settings, self._device(), group_key)
        comparisons = {}
        for file in sorted(folder.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[0])) if folder.exists() else []:
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
