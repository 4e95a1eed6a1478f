"""The diagonal empirical Fisher of EWC (METHOD §4) and the seeded sample of examples it uses.

``F_new`` is the mean over N training examples of the finished task of the *per-example*
squared gradient of the SFT loss, one example at a time through the trainer's own collator
(:func:`empirical_fisher`); online EWC folds it in place as ``F ← γ·F + F_new``. The N
examples are a seeded uniform sample (:func:`fisher_indices`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import torch

from cpt.errors import CptError
from cpt.tensors import unwrap_model
from cpt.training.ewc.penalty import penalised_tensors
from cpt.training.ewc.zero3 import local_square_accumulator, release_backward_leftovers


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def empirical_fisher(
    model: torch.nn.Module,
    examples: Iterable[dict[str, Any]],
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]],
    *,
    out: dict[str, torch.Tensor] | None = None,
    decay: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: mean over ``examples`` of the per-example squared gradient.

    Each example is collated alone (``collate_fn([example])``, the trainer's collator on
    its tokenized rows) and its loss is the model's own: the mean NLL over the example's
    label tokens, i.e. the SFT loss of a batch of one. Examples without any label token
    (no loss) are skipped. The model runs in eval mode (no dropout); its mode and
    ``requires_grad`` flags are restored afterwards, and no ``.grad`` is touched.

    With ``out`` (online EWC), returns ``out`` updated in place to ``decay·out + F_new``
    (no second Fisher-sized buffer); otherwise a new float32 dict.
    """
    terms = penalised_tensors(model)
    module = unwrap_model(model)
    leaves = [term.leaf for term in terms]
    device = leaves[0].device if leaves else torch.device("cpu")
    batches = []
    for example in examples:
        batch = collate_fn([example])
        labels = batch.get("labels")
        if labels is None:
            raise CptError("ewc: the collated examples have no 'labels'; the Fisher needs the SFT loss")
        if bool((labels[..., 1:] != -100).any()):
            batches.append(batch)
    if not batches:
        raise CptError("ewc: none of the Fisher examples has a completion token to compute a loss on")

    if out is None:
        out = {term.name: term.zeros() for term in terms}
    else:
        for term in terms:
            if term.name not in out:
                raise CptError(f"ewc: the stored Fisher has no entry for {term.name}; the trainable parameters changed")
            expected = term.zeros()
            if out[term.name].shape != expected.shape:
                raise CptError(
                    f"ewc: the stored Fisher of {term.name} has shape {tuple(out[term.name].shape)}, the model needs "
                    f"{tuple(expected.shape)}; the model or the number of ZeRO-3 processes changed since it was written"
                )
            out[term.name] = out[term.name].to(device=expected.device, dtype=torch.float32).mul_(decay)
    # One Fisher-sized buffer: F ← decay·F, then F += g²/N example by example.
    requires_grad_flags = [leaf.requires_grad for leaf in leaves]
    was_training = module.training
    sharded = bool(terms) and terms[0].shard is not None
    hooks = []
    try:
        module.eval()
        for leaf in leaves:
            leaf.requires_grad_(True)
        if sharded:
            # ZeRO-3: keep the rank's slice of g² as each full gradient appears, and hand
            # autograd a stride-0 zero instead, so no whole-model gradient is ever held.
            hooks = [
                term.leaf.register_hook(local_square_accumulator(out[term.name], term.shard, 1.0 / len(batches)))
                for term in terms
            ]
        with torch.enable_grad():
            for batch in batches:
                loss = module(**_to_device(batch, device), use_cache=False).loss
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                if sharded:
                    release_backward_leftovers(leaves[0])
                else:
                    for term, grad in zip(terms, grads):
                        if grad is not None:
                            out[term.name].addcmul_(grad.float(), grad.float(), value=1.0 / len(batches))
                del grads
    finally:
        for hook in hooks:
            hook.remove()
        for leaf, flag in zip(leaves, requires_grad_flags):
            leaf.requires_grad_(flag)
        module.train(was_training)
    return out


def fisher_indices(size: int, count: int, seed: int, step: int) -> list[int]:
    """The seeded uniform sample of ``count`` example indices (sorted) the Fisher of task ``step`` uses."""
    if count >= size:
        return list(range(size))
    return sorted(random.Random(f"cpt-ewc-fisher:{seed}:{step}").sample(range(size), count))
