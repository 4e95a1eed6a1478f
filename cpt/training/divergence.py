"""``DivergenceMonitor``: stop a task whose training stalled or exploded without a NaN loss.

A non-finite loss is caught by :class:`cpt.training.trainer.CptSFTTrainer`. Training can also
go wrong with every number finite: a learning rate of 1e6 drives the weights of a small
model to ~1e6, every logit saturates, the gradient norm becomes exactly 0 and the loss stays
at the same value — the task "finishes" and is integrated as if nothing happened. The monitor
looks at each logged step (``on_log``; ``training.logging_steps`` sets how often) and stops
the task when one of three rules trips:

* **zero gradient** — the logged gradient norm is ``≤ grad_norm_floor`` for ``patience``
  consecutive logged steps after the first (only when the trainer logs ``grad_norm``, i.e.
  ``max_grad_norm > 0``);
* **flat loss** — the logged loss moves by at most ``loss_rtol`` (relative) from one logged
  step to the next, ``patience`` times in a row;
* **weight growth** — the norm of the trainable weights exceeds ``max_weight_growth`` times
  its value when the task began (skipped under DeepSpeed ZeRO-3, where no rank holds the
  whole weights and the ranks must decide alike).

Stopping raises :class:`~cpt.errors.TrainingDivergedError` from the training loop: the
trainer never reaches ``on_train_end``, so the expert is not integrated and the last good
state stays in place; the runner records the one-line reason in the manifest.

Usage::

    trainer = SFTTrainer(model, args, train_dataset=data, callbacks=[DivergenceMonitor(patience=3)])

Args:
    patience: consecutive logged steps a stall must last (after the first logged step).
    grad_norm_floor: a logged gradient norm at or below this counts as zero.
    loss_rtol: relative change of the logged loss below which it has not moved.
    max_weight_growth: the largest allowed ratio of the trainable weights' norm to its start.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from cpt.errors import TrainingDivergedError
from cpt.tensors import is_zero3


class DivergenceMonitor(TrainerCallback):
    def __init__(
        self,
        *,
        patience: int = 3,
        grad_norm_floor: float = 0.0,
        loss_rtol: float = 1e-6,
        max_weight_growth: float = 100.0,
    ):
        if patience < 1 or grad_norm_floor < 0 or loss_rtol < 0 or max_weight_growth <= 1:
            raise ValueError("patience ≥ 1, grad_norm_floor ≥ 0, loss_rtol ≥ 0 and max_weight_growth > 1 are required")
        self.patience = patience
        self.grad_norm_floor = grad_norm_floor
        self.loss_rtol = loss_rtol
        self.max_weight_growth = max_weight_growth
        self._reset()

    @classmethod
    def from_spec(cls, spec) -> DivergenceMonitor | None:
        """The monitor for a recipe's ``divergence:`` section (None when disabled)."""
        if not spec.enabled:
            return None
        return cls(
            patience=spec.patience,
            grad_norm_floor=spec.grad_norm_floor,
            loss_rtol=spec.loss_rtol,
            max_weight_growth=spec.max_weight_growth,
        )

    def _reset(self) -> None:
        self.logged = 0
        self.zero_grad_run = 0
        self.flat_loss_run = 0
        self.previous_loss: float | None = None
        self.start_norm: float | None = None
        self.model = None

    @staticmethod
    def weight_norm(model: torch.nn.Module) -> float:
        """L2 norm of the trainable weights (float64 accumulation)."""
        total = torch.zeros((), dtype=torch.float64)
        for parameter in model.parameters():
            if parameter.requires_grad:
                total += parameter.detach().double().pow(2).sum().cpu()
        return math.sqrt(float(total))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._reset()
        if model is not None and not is_zero3(model):
            self.model = model
            self.start_norm = self.weight_norm(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # an evaluation or end-of-training summary
            return
        self.logged += 1
        step = state.global_step
        loss = float(logs["loss"])
        grad_norm = logs.get("grad_norm")
        if self.model is not None and self.start_norm:
            growth = self.weight_norm(self.model) / self.start_norm
            if not math.isfinite(growth):
                self._stop(f"the weights became non-finite (norm {growth}) by step {step}")
            if growth > self.max_weight_growth:
                self._stop(
                    f"the weights' norm grew {growth:.3g}-fold since the task began (step {step}; limit "
                    f"{self.max_weight_growth:g})"
                )
        if self.logged > 1 and grad_norm is not None:
            self.zero_grad_run = self.zero_grad_run + 1 if float(grad_norm) <= self.grad_norm_floor else 0
            if self.zero_grad_run >= self.patience:
                self._stop(
                    f"the gradient norm was {float(grad_norm):g} for {self.zero_grad_run} logged steps in a row (up to "
                    f"step {step})"
                )
        if self.previous_loss is not None and math.isfinite(loss):
            moved = abs(loss - self.previous_loss) > self.loss_rtol * abs(self.previous_loss)
            self.flat_loss_run = 0 if moved else self.flat_loss_run + 1
            if self.flat_loss_run >= self.patience:
                self._stop(
                    f"the loss stayed at {loss:.6g} for {self.flat_loss_run + 1} logged steps in a row (up to step "
                    f"{step})"
                )
        self.previous_loss = loss

    def on_train_end(self, args, state, control, **kwargs):
        self.model = None  # no reference to the task's model beyond its training

    def _stop(self, reason: str) -> None:
        raise TrainingDivergedError(
            f"training stalled or diverged: {reason}; the task was stopped and the previous state kept; "
            "lower the learning rate or check the data (thresholds: recipe 'divergence:')"
        )
