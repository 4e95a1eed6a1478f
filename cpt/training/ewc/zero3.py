"""EWC under DeepSpeed ZeRO-3: the shard math (the package docstring's "DeepSpeed ZeRO-3" section).

Every rank keeps F and θ* for its own slice of each penalised tensor's flat values. This
module holds everything that knows ZeRO-3's partition layout:

* :func:`local_shard` — (start, length) of this rank's slice of a parameter;
* :func:`merged_weight_local_slice` — a rank's slice of a LoRA layer's ``W₀ + s·B·A``,
  from the rows of B the slice covers only;
* :func:`add_ewc_gradients` — the penalty's gradient ``λ·F ⊙ (θ − θ*)`` added straight into
  the local gradient partitions (for LoRA: ``s·Bᵀ Z`` and ``s·Z Aᵀ``, summed over the ranks);
* :func:`sum_over_zero3_ranks` — the penalty's value, one scalar all-reduce;
* the Fisher's hooks: :func:`local_square_accumulator` (keep the rank's slice of g²) and
  :func:`release_backward_leftovers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from cpt.errors import CptError
from cpt.tensors import zero3_gathered

if TYPE_CHECKING:
    from cpt.training.ewc.penalty import PenalisedTensor


def local_shard(param: torch.nn.Parameter) -> tuple[int, int]:
    """(start, length) of this rank's slice of a ZeRO-3 parameter's flat values, padding excluded.

    ZeRO-3 gives rank r of the parameter's partition group the flat elements
    ``[r·P, (r+1)·P)`` (P = ``ds_tensor.ds_numel``), the last rank's partition padded past
    ``ds_numel``.
    """
    import torch.distributed as dist

    partition = int(param.ds_tensor.ds_numel)
    rank = dist.get_rank(group=param.ds_process_group) if dist.is_initialized() else 0
    start = partition * rank
    return start, max(0, min(partition, int(param.ds_numel) - start))


def sum_over_zero3_ranks(value: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """The sum of a per-rank float32 scalar over the ZeRO-3 partition group of ``param``."""
    import torch.distributed as dist

    value = value.detach().float().reshape(())
    if dist.is_initialized():
        dist.all_reduce(value, group=param.ds_process_group)
    return value


# ---------------------------------------------------------------------- LoRA: the merged weight's slice
def _lora_slice_rows(term: PenalisedTensor) -> tuple[int, int, int]:
    """The rows ``[first, last)`` of W the term's local slice touches, and the slice's offset in them."""
    start, length = term.shard
    columns = int(term.leaf.ds_shape[1])
    first, last = start // columns, (start + max(length, 1) - 1) // columns + 1
    return first, last, start - first * columns


@torch.no_grad()  # a value: no graph may hold the factors (it would keep the engine alive)
def _merged_slice_from_factors(term: PenalisedTensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """The local slice of ``W₀ + s·B·A`` (factors already gathered), from the rows of B it covers only."""
    local = term.leaf.ds_tensor.detach().view(-1)[: term.shard[1]]
    if term.shard[1] == 0:
        return local
    first, last, offset = _lora_slice_rows(term)
    block = (lora_b[first:last] @ lora_a) * float(term.layer.scaling[term.adapter])
    return local + block.reshape(-1)[offset : offset + term.shard[1]].to(local.dtype)


def merged_weight_local_slice(term: PenalisedTensor) -> torch.Tensor:
    """This rank's slice of a LoRA term's merged weight. A collective (gathers the factors): every rank calls it."""
    lora_a, lora_b = term.lora_factors()
    with zero3_gathered([lora_a, lora_b]):
        return _merged_slice_from_factors(term, lora_a, lora_b)


# ---------------------------------------------------------------------- the penalty's gradient
def _add_to_local_grad(param: torch.nn.Parameter, local: torch.Tensor) -> None:
    """Add ``local`` (this rank's slice of a gradient of ``param``, see :func:`local_shard`) to its ZeRO-3 gradient partition."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    grad = safe_get_local_grad(param)
    if grad is None or local.numel() == 0:
        return
    grad.view(-1)[: local.numel()].add_(local.to(grad.dtype))
    safe_set_local_grad(param, grad)


@torch.no_grad()
def _add_lora_shard_gradients(
    term: PenalisedTensor, fisher: torch.Tensor, anchor: torch.Tensor, coefficient: float
) -> None:
    """Add ∂/∂A, ∂/∂B of ``(coefficient/2)·Σ F (W_slice − W*)²`` to A's and B's local gradient partitions.

    A collective (gathers the factors once, sums the partial gradients over the ranks).
    """
    import torch.distributed as dist

    lora_a, lora_b = term.lora_factors()
    scale = float(term.layer.scaling[term.adapter])
    with zero3_gathered([lora_a, lora_b]):
        weighted = coefficient * fisher * (_merged_slice_from_factors(term, lora_a, lora_b).float() - anchor.float())
        grad_a = torch.zeros(lora_a.shape, dtype=torch.float32, device=weighted.device)
        grad_b = torch.zeros(lora_b.shape, dtype=torch.float32, device=weighted.device)
        if term.shard[1]:
            first, last, offset = _lora_slice_rows(term)
            rows = torch.zeros(last - first, lora_a.shape[1], dtype=torch.float32, device=weighted.device)
            rows.view(-1)[offset : offset + term.shard[1]] = weighted
            grad_a += scale * (lora_b[first:last].float().T @ rows)
            grad_b[first:last] = scale * (rows @ lora_a.float().T)
    for param, full_grad in ((lora_a, grad_a), (lora_b, grad_b)):
        if dist.is_initialized():
            dist.all_reduce(full_grad, group=param.ds_process_group)
        start, length = local_shard(param)
        _add_to_local_grad(param, full_grad.view(-1)[start : start + length])


@torch.no_grad()  # runs inside the engine's backward, where grad mode is on
def add_ewc_gradients(
    terms: Sequence[PenalisedTensor],
    fisher: dict[str, torch.Tensor],
    anchors: dict[str, torch.Tensor],
    ewc_lambda: float,
    scale: float = 1.0,
) -> None:
    """ZeRO-3: add ``scale·λ·F ⊙ (θ − θ*)`` (the penalty's gradient) to each local gradient partition.

    Call between the backward pass of an optimizer step's last micro-batch and the step:
    the partitions then hold the reduced gradient of the task loss, and the optimizer
    clips and applies the sum, as in the plain run. ``scale`` is the optimizer's current
    loss scale (fp16), by which those partitions are still multiplied.
    """
    for term in terms:
        if term.shard is None:
            raise CptError(f"ewc: {term.name} is not a ZeRO-3 partitioned parameter")
        if term.is_lora:
            _add_lora_shard_gradients(term, fisher[term.name], anchors[term.name], scale * ewc_lambda)
        elif term.leaf.requires_grad:
            _add_to_local_grad(
                term.leaf,
                (scale * ewc_lambda) * fisher[term.name] * (term.value().float() - anchors[term.name].float()),
            )


# ---------------------------------------------------------------------- the Fisher's backward
def release_backward_leftovers(param: torch.nn.Parameter) -> None:
    """Re-partition what this backward gathered but no post-backward hook released.

    DeepSpeed's engine does this at the end of its own backward; a backward outside the
    engine (the Fisher's) must do it too, or the next gather of those parameters fails.
    """
    optimizer = getattr(param, "_z3_optimizer", None)
    if optimizer is not None:
        optimizer.parameter_offload.release_backward_leftovers()


def local_square_accumulator(target: torch.Tensor, shard: tuple[int, int], weight: float):
    """A gradient hook: ``target += weight·g_slice²`` for this rank's slice, then a stride-0 zero for autograd.

    So the Fisher never holds a whole-model gradient: each full per-example gradient exists
    only while autograd hands it to this hook.
    """
    start, length = shard

    def hook(grad: torch.Tensor) -> torch.Tensor:
        local = grad.detach().reshape(-1)[start : start + length].float()
        target.addcmul_(local.to(target.device), local.to(target.device), value=weight)
        return grad.new_zeros(()).expand_as(grad)

    return hook
