"""``AIMMergingCallback``: AIMMerging (METHOD §4.B) as a reusable TrainerCallback."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Trainer, TrainerCallback

from cpt.errors import CptError
from cpt.io import atomic_write_json
from cpt.training.aim import AIMSchedule, merge_tensor

#: The collated keys a causal LM's forward takes for its loss (TRL's collator may add others).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


class AIMMergingCallback(TrainerCallback):
    """Adaptive Iterative Model Merging during training (METHOD §4.B).

    At every optimizer step (``on_step_end``, where the reference calls it, L2433) it

    1. **probes** the forgetting signal: the loss on one random memory batch, no grad, the
       model left in train mode, divided by the gradient-accumulation count (§4.B step 1);
    2. feeds it to the **threshold and flag rules** (:meth:`cpt.training.aim.AIMSchedule.observe`,
       §4.B step 2);
    3. when the schedule says so, **merges** (§4.B step 3): ``θ_k ← P``; ``M`` outer steps on
       fresh memory batches (backward, clip to ``max_grad_norm``, step the task's optimizer
       without stepping the LR schedule, zero the gradients); ``P ← A + w_in Δ_in + w_out Δ_out``
       with the weight table; ``A ← P``; then the learning signal and the adaptive interval.

    P is every trainable tensor: the LoRA factors A and B separately under PEFT (as the
    reference), every trainable parameter under full fine-tuning. Extra memory: two copies
    of P (the anchor and ``θ_k``). With an empty memory (task 1) the callback does nothing,
    so the task is plain fine-tuning.

    Usage::

        aim = AIMMergingCallback(memory_dataset)        # prompt/completion rows of earlier tasks
        trainer = SFTTrainer(model, args, train_dataset=task_dataset, callbacks=[aim])
        aim.bind_trainer(trainer)                        # tokenizes the memory, logs via trainer.log
        trainer.train()
        aim.merges                                       # one record per merge

    Without :meth:`bind_trainer` the memory must already be tokenized (``input_ids``; it is
    collated with the trainer's collator) and the statistics go to ``state.log_history``.
    Metrics logged through the trainer (with its next training log, so its own log line stays
    intact): ``aim/probe_loss`` (mean since the previous log), ``aim/threshold``, ``aim/flags``
    and, for each merge, ``aim/merge_step``, ``aim/interval``,
    ``aim/next_interval``, ``aim/outer_steps``, ``aim/w_in``, ``aim/w_out``,
    ``aim/inner_l1``, ``aim/outer_l1``, ``aim/learning_signal``, ``aim/gamma``,
    ``aim/outer_loss``, ``aim/forced``.

    Args:
        memory: a ``datasets.Dataset`` of earlier tasks' examples (``prompt``/``completion``
            rows, or tokenized rows), or ``None`` for no memory.
        inner_iterations, outer_iterations, cold_start_step, max_step_len, min_step_len,
        threshold_factor, calib_frac, force_flags, important_k, halve_at, adaptive: the
            schedule's parameters (METHOD §4.B table; :class:`cpt.training.aim.AIMSchedule`).
        outer_batch_size: examples per probe and outer batch (32).
        outer_optimizer: ``task`` (step the trainer's optimizer, the reference's fp32 path) or
            ``separate`` (an AdamW with ``outer_lr``).
        outer_lr: learning rate of the separate outer optimizer.
        seed: seeds the memory batches (the reference's are unseeded).
        record_path: if given, the per-step and per-merge record is written there (JSON,
            atomically) at the end of training.
    """

    def __init__(
        self,
        memory: Any = None,
        *,
        inner_iterations: int = 8,
        outer_iterations: int = 8,
        cold_start_step: int = 3,
        max_step_len: int = 128,
        min_step_len: int = 2,
        threshold_factor: float = 2.0,
        calib_frac: float = 2 / 3,
        force_flags: int = 3,
        important_k: int = 70,
        halve_at: int = 64,
        outer_batch_size: int = 32,
        adaptive: bool = True,
        outer_optimizer: Literal["task", "separate"] = "task",
        outer_lr: float = 1e-3,
        seed: int | str = 0,
        record_path: str | Path | None = None,
    ):
        if outer_optimizer not in ("task", "separate"):
            raise CptError(f"outer_optimizer: must be 'task' or 'separate', not {outer_optimizer!r}")
        if outer_batch_size < 1:
            raise CptError(f"outer_batch_size: must be ≥ 1 (got {outer_batch_size})")
        self.memory = memory
        self.schedule = AIMSchedule(
            inner_iterations=inner_iterations,
            outer_iterations=outer_iterations,
            cold_start_step=cold_start_step,
            max_step_len=max_step_len,
            min_step_len=min_step_len,
            threshold_factor=threshold_factor,
            calib_frac=calib_frac,
            force_flags=force_flags,
            important_k=important_k,
            halve_at=halve_at,
            adaptive=adaptive,
        )
        self.outer_batch_size = int(outer_batch_size)
        self.outer_optimizer = outer_optimizer
        self.outer_lr = float(outer_lr)
        self.seed = seed
        self.record_path = Path(record_path) if record_path is not None else None
        self.trainer = None
        self.enabled = False
        self.steps: list[dict[str, Any]] = []
        """Per step: g, the probe loss, the phase, δ, f, and the training loss at logging steps."""
        self.merges: list[dict[str, Any]] = []
        """Per merge: see :meth:`cpt.training.aim.AIMSchedule.finish_merge`, plus ‖Δ_in‖₁, ‖Δ_out‖₁, the outer loss."""
        self._prepared_memory = None
        self._pending: list[dict[str, float]] = []
        self._flushed_steps = 0
        self._collate = None
        self._params: list[tuple[str, torch.nn.Parameter]] = []
        self._anchor: list[torch.Tensor] = []
        self._separate_optimizer = None
        self._rng = random.Random(f"cpt-aim-batches:{seed}")

    # ------------------------------------------------------------------ hooks
    def bind_trainer(self, trainer) -> None:
        """Use the trainer's tokenization, accelerator and ``trainer.log``."""
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.steps, self.merges = [], []
        self._pending, self._flushed_steps = [], 0
        # A task resumed from a trainer checkpoint restarts the schedule at the resumed step.
        self.schedule.reset(start_step=int(getattr(state, "global_step", 0) or 0))
        self._rng = random.Random(f"cpt-aim-batches:{self.seed}")
        self.enabled = self.memory is not None and len(self.memory) > 0
        if not self.enabled:  # task 1: plain fine-tuning (§4.B)
            return
        deepspeed = bool(getattr(args, "deepspeed", None)) or bool(getattr(self.trainer, "is_deepspeed_enabled", False))
        if deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise CptError(
                "aim_merging: runs on a single process without DeepSpeed (its outer steps are not yet "
                "implemented for distributed training); launch without accelerate/deepspeed"
            )
        self._prepared_memory = self._prepare_memory(args)
        self._collate = (
            self.trainer.data_collator if self.trainer is not None else getattr(train_dataloader, "collate_fn", None)
        )
        if self._collate is None:
            raise CptError("AIMMergingCallback: no collator; call bind_trainer(trainer) before training")
        # §4.B "State": the anchor A ← P at train begin (reference L2244).
        self._params = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        if not self._params:
            raise CptError("aim_merging: the model has no trainable parameters")
        self._anchor = [param.detach().clone() for _, param in self._params]
        if self.outer_optimizer == "separate":
            self._separate_optimizer = torch.optim.AdamW([param for _, param in self._params], lr=self.outer_lr)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.enabled:
            return
        step = state.global_step
        probe = self.probe_loss(model, args)  # §4.B step 1
        phase = self.schedule.observe(step, probe)  # §4.B step 2
        record = {
            "step": step,
            "probe_loss": probe,
            "phase": phase,
            "threshold": self.schedule.threshold,
            "flags": self.schedule.flags,
        }
        self.steps.append(record)
        if self.schedule.should_merge(step):  # §4.B step 3
            self.merge(model, optimizer, args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs or "loss" not in logs:
            return
        # The trainer's own training log of this step (it comes after on_step_end): attach the
        # loss to the step's record and emit what AIM has to log since the previous one.
        if self.steps and self.steps[-1]["step"] == state.global_step:
            self.steps[-1]["train_loss"] = logs["loss"]
        self._flush(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.enabled:
            self._flush(state)
        if self.record_path is not None and (getattr(state, "is_world_process_zero", True)):
            atomic_write_json(self.record_path, {"summary": self.summary(), "merges": self.merges, "steps": self.steps})
        self._anchor = []  # free the copy of P
        self._separate_optimizer = None

    # ------------------------------------------------------------------ the pieces
    def memory_batch(self) -> list[dict[str, Any]]:
        """A random memory batch: the first ``outer_batch_size`` of a fresh seeded permutation."""
        order = list(range(len(self._prepared_memory)))
        self._rng.shuffle(order)
        return [self._prepared_memory[index] for index in order[: self.outer_batch_size]]

    def memory_loss(self, model: torch.nn.Module, rows: list[dict[str, Any]]) -> torch.Tensor:
        """The model's loss on a memory batch (the token-mean completion NLL of the collated batch)."""
        batch = self._collate(rows)
        device = next(model.parameters()).device
        inputs = {
            key: value.to(device) for key, value in batch.items() if key in MODEL_INPUTS and torch.is_tensor(value)
        }
        context = self.trainer.autocast_smart_context_manager() if self.trainer is not None else nullcontext()
        with context:
            return model(**inputs, use_cache=False).loss

    def probe_loss(self, model: torch.nn.Module, args) -> float:
        """§4.B step 1: ``L_g`` on one random memory batch, no grad, train mode kept, divided by GA (L2437-2454)."""
        with torch.no_grad():
            loss = self.memory_loss(model, self.memory_batch())
        return float(loss.detach()) / max(1, int(getattr(args, "gradient_accumulation_steps", 1)))

    def outer_step(self, model: torch.nn.Module, optimizer, args) -> float:
        """One outer step (§4.B step 3, L2536-2627): backward (loss / GA), clip, optimizer step, zero grads."""
        loss = self.memory_loss(model, self.memory_batch()) / max(
            1, int(getattr(args, "gradient_accumulation_steps", 1))
        )
        if self.trainer is not None:
            self.trainer.accelerator.backward(loss)
        else:
            loss.backward()
        params = [param for _, param in self._params]
        max_norm = float(getattr(args, "max_grad_norm", 1.0) or 0)
        if max_norm > 0:
            if self.trainer is not None:
                self.trainer.accelerator.clip_grad_norm_(params, max_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
        step_optimizer = self._separate_optimizer if self._separate_optimizer is not None else optimizer
        step_optimizer.step()  # the LR schedule is not stepped (reference L2623)
        step_optimizer.zero_grad()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    def merge(self, model: torch.nn.Module, optimizer, args, state) -> dict[str, Any]:
        """§4.B step 3 at the current step; returns (and records) the merge's statistics."""
        params = [param for _, param in self._params]
        inner = [param.detach().clone() for param in params]  # θ_k ← P (L2531)
        outer_losses = [self.outer_step(model, optimizer, args) for _ in range(self.schedule.outer_steps)]
        w_in, w_out = self.schedule.weights()
        inner_l1 = 0.0
        outer_l1 = 0.0
        with torch.no_grad():
            for param, anchor, inner_value in zip(params, self._anchor, inner):
                inner_l1 += float((inner_value.double() - anchor.double()).abs().sum())  # ‖Δ_in‖₁
                outer_l1 += float((param.double() - inner_value.double()).abs().sum())  # ‖Δ_out‖₁ (L2638)
                param.copy_(merge_tensor(anchor, inner_value, param, w_in, w_out))
                anchor.copy_(param)  # A ← P (L2656)
        del inner
        record = self.schedule.finish_merge(state.global_step, inner_l1)
        record.update(
            {
                "inner_l1": inner_l1,
                "outer_l1": outer_l1,
                "outer_loss": sum(outer_losses) / len(outer_losses) if outer_losses else None,
            }
        )
        self.merges.append(record)
        metrics = {
            "aim/merge_step": record["step"],
            "aim/interval": record["interval"],
            "aim/next_interval": record["next_interval"],
            "aim/outer_steps": record["outer_steps"],
            "aim/flags": record["flags"],
            "aim/forced": float(record["forced"]),
            "aim/w_in": w_in,
            "aim/w_out": w_out,
            "aim/inner_l1": inner_l1,
            "aim/outer_l1": outer_l1,
            "aim/learning_signal": record["learning_signal"],
        }
        if record["gamma"] is not None:
            metrics["aim/gamma"] = float(record["gamma"])
        if record["outer_loss"] is not None:
            metrics["aim/outer_loss"] = record["outer_loss"]
        self._log(args, state, metrics)
        return record

    def summary(self) -> dict[str, Any]:
        """What the run record keeps of this task."""
        probes = [row["probe_loss"] for row in self.steps]
        return {
            "aim_memory_examples": len(self.memory) if self.memory is not None else 0,
            "aim_merges": len(self.merges),
            "aim_merge_steps": [merge["step"] for merge in self.merges],
            "aim_forced_merges": sum(1 for merge in self.merges if merge["forced"]),
            "aim_final_interval": self.schedule.interval,
            "aim_final_outer_steps": self.schedule.outer_steps,
            "aim_mean_probe_loss": sum(probes) / len(probes) if probes else None,
        }

    # ------------------------------------------------------------------ internals
    def _prepare_memory(self, args):
        memory = self.memory
        if "input_ids" in memory.column_names:
            return memory
        if self.trainer is None:
            raise CptError(
                "AIMMergingCallback: the memory holds untokenized rows; call bind_trainer(trainer) "
                "so it is tokenized like the training set"
            )
        prepared = self.trainer._prepare_dataset(
            memory, self.trainer.processing_class, self.trainer.args, False, None, "aim_memory"
        )
        keep = [
            column for column in prepared.column_names if column not in ("prompt", "completion", "text", "messages")
        ]
        return prepared.select_columns(keep)

    def _log(self, args, state, metrics: dict[str, float]) -> None:
        """Queue metrics for the next :meth:`_flush` (bound) or write them to ``state.log_history`` (unbound)."""
        if self.trainer is not None:
            self._pending.append(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    def _flush(self, state) -> None:
        """Emit the probe statistics since the last flush and the queued merge metrics through the trainer.

        Logging from ``on_step_end`` would cancel the trainer's own log of that step (the
        callback handler's ``on_log`` clears ``control.should_log``), so metrics wait for the
        trainer's next training log (or the end of training). ``transformers.Trainer.log`` is
        called, not TRL's ``SFTTrainer.log``: that override folds its running training metrics
        (entropy, token accuracy) into whatever is logged and resets them.
        """
        if self.trainer is None:
            return
        fresh = self.steps[self._flushed_steps :]
        self._flushed_steps = len(self.steps)
        if fresh:
            self._pending.insert(
                0,
                {
                    "aim/probe_loss": sum(row["probe_loss"] for row in fresh) / len(fresh),
                    "aim/threshold": self.schedule.threshold,
                    "aim/flags": self.schedule.flags,
                },
            )
        pending, self._pending = self._pending, []
        for metrics in pending:
            Trainer.log(self.trainer, metrics)
