"""Elastic weight consolidation (METHOD §4): the Fisher, the penalty, and the ``ewc`` strategy.

    L = L_task + (λ/2) Σ_i F_i (θ_i − θ*_i)²,      online EWC: F ← γ F + F_new

* ``F_new`` is the diagonal empirical Fisher of the task just finished: the mean over N of
  its training examples of the *per-example* squared gradient of the SFT loss (one example
  at a time, through the trainer's own tokenized dataset and collator, so each example's
  loss is exactly the token-mean completion NLL the trainer optimises).
* ``θ*`` are the weights at the end of that task.

What is penalised ("the penalised tensors" below):

* full fine-tuning: every trainable parameter;
* PEFT LoRA: the *merged* weight ``W = W₀ + s·B·A`` of every LoRA target layer (plus any
  other trainable parameter, e.g. ``modules_to_save``). The adapter itself is not a
  meaningful anchor: cpt starts a fresh adapter on the merged state θ_{t−1} for each task,
  so ``A``, ``B`` of task t have nothing to do with those of task t−1. Penalising the
  merged weights is exactly EWC on the model the state holds: ``F`` is the per-example
  squared gradient with respect to the full weight ``W`` of the target layer (computed as
  the gradient of the frozen base weight, which equals ∂L/∂W), ``θ*`` the merged weight at
  the end of the task (= the state the next task starts from), and the penalty's gradient
  flows into ``A`` and ``B`` through ``W``. Cost: F and θ* hold one copy of the target
  layers' full weights each (not of the small adapter).

Memory: F (float32) and θ* (the parameter's dtype) are one extra copy each of the
penalised tensors. The penalty is an autograd function that saves no new tensor for the
backward pass (it recomputes θ − θ* there, one tensor at a time), so a training step
holds no further copy.

DeepSpeed ZeRO-3: every rank keeps F and θ* for its own shard of each penalised tensor
only (the slice of the flat values ZeRO-3 assigns it; padding excluded; for a LoRA layer
the slice of its merged weight that matches its base weight's shard), so no rank ever
holds a whole-model copy:

* the Fisher runs the same N examples on every rank; each parameter's full per-example
  gradient exists only transiently, while autograd computes it (as in plain training), and
  a gradient hook keeps just the rank's slice of its square;
* the penalty's gradient λ·F ⊙ (θ − θ*) is added straight into ZeRO-3's local gradient
  partition before each optimizer step (:func:`add_ewc_gradients`, called by
  :class:`cpt.training.trainer.CptSFTTrainer`), which is where the plain run's autograd
  gradient of the penalty would have been reduced to; the penalty's value is the sum of
  the ranks' local sums (one scalar all-reduce) and is logged like the plain run's;
* LoRA: the small factors A, B are gathered whole for a moment (never the base weight);
  a rank's slice of ``W₀ + s·B·A`` needs only the rows of B its slice covers, and the
  gradients ``s·Bᵀ Z`` and ``s·Z Aᵀ`` (Z: the rank's λF ⊙ (W − W*) placed in those rows)
  are summed over the ranks, each rank adding its own partition of them;
* each rank stores its shard (see :class:`callbacks.EWCCallback`), so a resumed run needs
  the same number of processes.

Default λ = 100. F is the mean squared gradient of a *per-token mean* loss. For a model
that fits its task, the Hessian of a sequence's NLL is ≈ the Fisher of the sequence score
g_seq; the per-example gradient of the token-mean loss is g_seq/T (T completion tokens),
so F ≈ H_tokenmean / T. With λ ≈ T the penalty (λ/2)·Σ F Δθ² is then the Laplace
(second-order) estimate of how much the earlier tasks' token-mean loss rises, weighed
equally with the new task's loss. λ = 100 is that order for instruction-tuning completions
(tens to a few hundred tokens); sweep it by factors of 10 for your data (larger = less
forgetting, less plasticity).

Where each piece lives:

* :mod:`~cpt.training.ewc.penalty` — the penalised tensors (:class:`PenalisedTensor`,
  :func:`penalised_tensors`), θ* (:func:`current_values`) and the loss term
  (:func:`ewc_penalty`, with its memory-frugal autograd functions);
* :mod:`~cpt.training.ewc.zero3` — ZeRO-3 shard math: a rank's slice of a parameter
  (:func:`local_shard`), of a LoRA layer's merged weight, the penalty's gradient added to the
  local gradient partitions (:func:`add_ewc_gradients`), the sum over ranks;
* :mod:`~cpt.training.ewc.fisher` — the diagonal empirical Fisher (:func:`empirical_fisher`)
  and its seeded example sample (:func:`fisher_indices`);
* :mod:`~cpt.training.ewc.storage` — F and θ* on disk (``step_<t>/{fisher,anchors}.safetensors``);
* :mod:`~cpt.training.ewc.strategy` — the registered ``ewc`` strategy (:class:`EWC`, :class:`EWCParams`);
  the training-time work is :class:`callbacks.EWCCallback`.
"""

from __future__ import annotations

from cpt.training.ewc.fisher import empirical_fisher, fisher_indices
from cpt.training.ewc.penalty import DEFAULT_EWC_LAMBDA, PenalisedTensor, current_values, ewc_penalty, penalised_tensors
from cpt.training.ewc.storage import ANCHORS_FILE, FISHER_FILE, load_ewc_state, save_ewc_state, step_dir, stored_steps
from cpt.training.ewc.strategy import EWC, EWCParams  # registers the ``ewc`` strategy
from cpt.training.ewc.zero3 import add_ewc_gradients, local_shard, sum_over_zero3_ranks

__all__ = [
    "DEFAULT_EWC_LAMBDA",
    "add_ewc_gradients",
    "EWC",
    "EWCParams",
    "PenalisedTensor",
    "current_values",
    "empirical_fisher",
    "ewc_penalty",
    "fisher_indices",
    "load_ewc_state",
    "local_shard",
    "penalised_tensors",
    "save_ewc_state",
    "stored_steps",
    "sum_over_zero3_ranks",
]
