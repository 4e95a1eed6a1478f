"""``EWCCallback``: elastic weight consolidation (METHOD §4) as a reusable TrainerCallback."""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from cpt.errors import CptError
from cpt.tensors import is_zero3, read_marker, unwrap_model
from cpt.training.ewc import (
    DEFAULT_EWC_LAMBDA,
    add_ewc_gradients,
    current_values,
    empirical_fisher,
    ewc_penalty,
    fisher_indices,
    load_ewc_state,
    penalised_tensors,
    save_ewc_state,
    stored_steps,
    sum_over_zero3_ranks,
)


class EWCCallback(TrainerCallback):
    """Online EWC: ``L = L_task + (λ/2) Σ F (θ − θ*)²``, ``F ← γF + F_new`` after each task.

    One instance serves a whole sequence of trainers (tasks): it counts the tasks itself
    (``step``) and keeps ``F`` and ``θ*`` between them. At ``on_train_end`` it computes the
    diagonal empirical Fisher of the task just trained on ``fisher_examples`` of the
    trainer's own tokenized training rows (a sample seeded by ``args.seed`` and the task's
    step; see :func:`cpt.training.ewc.empirical_fisher`), folds it into ``F`` and sets the
    anchors ``θ*`` to the current weights. What is penalised — every trainable parameter,
    or under PEFT LoRA the merged weights of the target layers — is described in
    :mod:`cpt.training.ewc`. With :class:`cpt.training.trainer.CptSFTTrainer` its
    :meth:`loss_term` is added to every training step's loss.

    Usage::

        from cpt.callbacks import EWCCallback
        from cpt.training.trainer import CptSFTTrainer

        ewc = EWCCallback(ewc_lambda=100.0, output_dir="ewc")
        for dataset in tasks:
            trainer = CptSFTTrainer(model, args, train_dataset=dataset, callbacks=[ewc])
            trainer.train()          # task 1: no penalty; at its end: F, θ*
            model = trainer.model    # (merge a LoRA adapter here if you use one)

    Args:
        ewc_lambda: λ, the penalty's weight.
        gamma: online decay γ of the earlier tasks' Fisher.
        fisher_examples: N, the training rows the Fisher is estimated on.
        output_dir: if given, ``F`` and ``θ*`` are saved there after each task as
            ``step_<t>/{fisher,anchors}.safetensors`` (atomically) and loaded back on
            construction, so a resumed run continues with them. Under DeepSpeed ZeRO-3
            every rank stores its own shard in ``zero3-rank<r>-of-<n>/step_<t>/``; create
            the callback after the ``SFTConfig``/``TrainingArguments`` (which registers the
            ZeRO-3 config) and resume with the same number of processes.
        state_dir: the state folder (as in the other callbacks), when the loop keeps one
            (e.g. with an :class:`~cpt.callbacks.IntegrationCallback`): at every
            ``on_train_begin`` the step is then one more than the step its
            ``cpt_state.json`` marker says it holds, and F and θ* of the step before are
            loaded from ``output_dir`` if the callback holds others (a task retrained).
            Without a marker the callback keeps its own count.
        step: the 1-based index of the task the next ``on_train_end`` finishes (an
            override: it also turns off ``state_dir``'s marker). With ``output_dir``, the
            state of ``step − 1`` is loaded (it must exist for step > 1). Default: from
            ``state_dir``'s marker, else one more than the newest stored step (or 1), then
            counting up.
        task_name: recorded in the files' metadata (default: the trainer's ``args.run_name``).
    """

    loss_term_name = "ewc_penalty"

    def __init__(
        self,
        ewc_lambda: float = DEFAULT_EWC_LAMBDA,
        gamma: float = 1.0,
        fisher_examples: int = 32,
        *,
        output_dir: str | Path | None = None,
        state_dir: str | Path | None = None,
        step: int | None = None,
        task_name: str | None = None,
    ):
        if ewc_lambda < 0 or not 0 <= gamma <= 1 or fisher_examples <= 0:
            raise CptError(
                "ewc: need ewc_lambda ≥ 0, 0 ≤ gamma ≤ 1 and fisher_examples > 0 "
                f"(got {ewc_lambda}, {gamma}, {fisher_examples})"
            )
        self.ewc_lambda = float(ewc_lambda)
        self.gamma = float(gamma)
        self.fisher_examples = int(fisher_examples)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._step_given = step is not None
        self.task_name = task_name
        self.fisher: dict[str, torch.Tensor] | None = None
        """F per penalised tensor (float32); None before the first task ends."""
        self.anchors: dict[str, torch.Tensor] | None = None
        """θ* per penalised tensor."""
        self.stats: dict[str, Any] = {}
        self._terms: tuple[weakref.ref, list] | None = None

        #: Created under a ZeRO-3 config: F and θ* hold this rank's shards (see cpt.training.ewc).
        self.sharded = _zero3_config_active()
        #: Where F and θ* are stored: ``output_dir``, or this rank's folder in it under ZeRO-3.
        self.storage_dir = self.output_dir
        if self.output_dir is not None and self.sharded:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            self.storage_dir = self.output_dir / f"zero3-rank{rank:05d}-of-{world:05d}"
        stored = stored_steps(self.storage_dir) if self.storage_dir is not None else []
        if step is None:
            step = self._step_in_state_folder()
        if step is None:
            step = (max(stored) + 1) if stored else 1
        if step < 1:
            raise CptError(f"ewc: step must be ≥ 1 (got {step})")
        self.step = step
        if step > 1 and self.storage_dir is not None:
            self.fisher, self.anchors = load_ewc_state(self.storage_dir, step - 1)

    # ------------------------------------------------------------------ the penalty
    def _penalised(self, model: torch.nn.Module) -> list:
        """The model's penalised tensors, with F and θ* moved next to them (once per model)."""
        module = unwrap_model(model)
        if self._terms is None or self._terms[0]() is not module:
            if is_zero3(module) != self.sharded:
                found, expected = ("not partitioned", "a") if self.sharded else ("partitioned", "no")
                raise CptError(
                    f"EWCCallback: the model is {found} by DeepSpeed ZeRO-3 but the callback was created with "
                    f"{expected} ZeRO-3 config registered; create it after this run's SFTConfig/TrainingArguments"
                )
            terms = penalised_tensors(module)
            for term in terms:
                for store in (self.fisher, self.anchors):
                    if store is not None and term.name in store and store[term.name].device != term.leaf.device:
                        store[term.name] = store[term.name].to(term.leaf.device)
            self._terms = (weakref.ref(module), terms)
        return self._terms[1]

    def loss_term(self, model: torch.nn.Module) -> torch.Tensor:
        """(λ/2) Σ F (θ − θ*)² for the current weights; zero before the first task has ended."""
        if self.fisher is None or self.ewc_lambda == 0:
            return torch.zeros((), device=next(unwrap_model(model).parameters()).device)
        return ewc_penalty(self._penalised(model), self.fisher, self.anchors, self.ewc_lambda)

    def add_sharded_gradients(self, model: torch.nn.Module, loss_scale: float = 1.0) -> None:
        """ZeRO-3: add the penalty's gradient to the local gradient partitions (before each optimizer step).

        :class:`cpt.training.trainer.CptSFTTrainer` calls this at every optimizer step under
        ZeRO-3, where :meth:`loss_term` is the penalty's value only.
        """
        if self.fisher is not None and self.ewc_lambda != 0:
            add_ewc_gradients(self._penalised(model), self.fisher, self.anchors, self.ewc_lambda, loss_scale)

    # ------------------------------------------------------------------ end of a task
    def consolidate(self, model: torch.nn.Module, examples, collate_fn) -> None:
        """F ← γF + F_new (``examples`` collated one at a time), θ* ← the current weights."""
        self._terms = None
        self.fisher = empirical_fisher(model, examples, collate_fn, out=self.fisher, decay=self.gamma)
        self.anchors = None  # free the old anchors before copying the new ones
        self.anchors = current_values(self._penalised(model))

    def _step_in_state_folder(self) -> int | None:
        """One more than the step ``state_dir``'s marker says it holds; None without a marker."""
        marker = read_marker(self.state_dir) if self.state_dir is not None else None
        return int(marker["step"]) + 1 if marker else None

    def _move_to_step(self, step: int) -> None:
        """Make ``step`` the task the next ``on_train_end`` finishes, with F and θ* of ``step − 1``."""
        if step == 1:
            self.fisher = self.anchors = None
        elif self.storage_dir is not None:
            self.fisher, self.anchors = load_ewc_state(self.storage_dir, step - 1)
        else:
            raise CptError(
                f"EWCCallback: {self.state_dir} holds task {step - 1} but the callback has F and θ* of task "
                f"{self.step - 1}; give it output_dir= (F and θ* of every task are kept there) or an explicit step="
            )
        self.step = step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._terms = None  # a new trainer may hold a new model (e.g. a fresh LoRA adapter)
        step = None if self._step_given else self._step_in_state_folder()
        if step is not None and step != self.step:  # e.g. a task retrained, or the state folder restored
            self._move_to_step(step)
        if model is not None:
            self._penalised(model)  # an unsupported model fails now, not after the task has trained

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if train_dataloader is None:
            raise CptError(
                "EWCCallback: the trainer passed no train_dataloader; "
                "call consolidate(model, examples, collate_fn) yourself"
            )
        dataset = train_dataloader.dataset
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            indices = fisher_indices(len(dataset), self.fisher_examples, args.seed, self.step)
            examples = [dataset[index] for index in indices]
        else:  # an IterableDataset: its first N rows
            examples = [row for _, row in zip(range(self.fisher_examples), dataset)]
        self.consolidate(model, examples, train_dataloader.collate_fn)
        fisher_sum = torch.stack([tensor.sum() for tensor in self.fisher.values()]).sum()
        if self.sharded:
            fisher_sum = sum_over_zero3_ranks(fisher_sum, self._penalised(model)[0].leaf)
        self.stats = {
            "ewc_step": self.step,
            "fisher_examples": len(examples),
            "penalised_tensors": len(self.fisher),
            "fisher_sum": float(fisher_sum),
        }
        if self.storage_dir is not None and (state.is_world_process_zero or self.sharded):
            task_name = self.task_name or getattr(args, "run_name", None) or ""
            metadata = {
                "task": task_name,
                "gamma": self.gamma,
                "ewc_lambda": self.ewc_lambda,
                "fisher_examples": len(examples),
            }
            save_ewc_state(self.storage_dir, self.step, self.fisher, self.anchors, metadata)
        self.step += 1


def _zero3_config_active() -> bool:
    """True when transformers has a DeepSpeed ZeRO-3 config registered (by TrainingArguments/SFTConfig)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())
