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
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field

from cpt.errors import CptError
from cpt.integration import IntegrationContext, TaskContext
from cpt.io import commit_dir, recover_dir, staging_dir
from cpt.strategies import Strategy, register_strategy
from cpt.tensors import _lora_layers, is_peft_model, is_zero3, unwrap_model, zero3_gathered

DEFAULT_EWC_LAMBDA = 100.0
FISHER_FILE = "fisher.safetensors"
ANCHORS_FILE = "anchors.safetensors"


@dataclass
class EWCParams:
    ewc_lambda: Annotated[float, Field(ge=0)] = DEFAULT_EWC_LAMBDA
    """λ of METHOD §4 (see the module docstring for the default)."""
    gamma: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Online-EWC decay: F ← γ·F + F_new at the end of each task (1 = sum of all tasks' Fishers)."""
    fisher_examples: Annotated[int, Field(gt=0)] = 32
    """N: training examples of the finished task the Fisher is averaged over (a seeded sample)."""


# ---------------------------------------------------------------------- penalty autograd
def _no_autocast(tensor: torch.Tensor):
    """The penalty is computed in float32 even inside a bf16/fp16 autocast region."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


class _DiagonalQuadratic(torch.autograd.Function):
    """Σ F ⊙ (θ − θ*)² in float32; saves only references (θ − θ* is recomputed in backward)."""

    @staticmethod
    def forward(ctx, theta, fisher, anchor):
        ctx.save_for_backward(theta, fisher, anchor)
        with _no_autocast(theta):
            diff = theta.detach().float() - anchor.float()
            return (fisher * diff * diff).sum()

    @staticmethod
    def backward(ctx, grad):
        theta, fisher, anchor = ctx.saved_tensors
        with _no_autocast(theta):
            diff = theta.float() - anchor.float()
            return (2 * grad * fisher * diff).to(theta.dtype), None, None


class _LoraQuadratic(torch.autograd.Function):
    """Σ F ⊙ (W₀ + s·B·A − W*)² in float32, differentiable in A, B (and W₀ if it trains)."""

    @staticmethod
    def forward(ctx, lora_a, lora_b, base, fisher, anchor, scale):
        ctx.save_for_backward(lora_a, lora_b, base, fisher, anchor)
        ctx.scale = scale
        with _no_autocast(base):
            diff = _lora_diff(lora_a.detach(), lora_b.detach(), base.detach(), anchor, scale)
            return (fisher * diff * diff).sum()

    @staticmethod
    def backward(ctx, grad):
        lora_a, lora_b, base, fisher, anchor = ctx.saved_tensors
        with _no_autocast(base):
            weighted = 2 * grad * fisher * _lora_diff(lora_a, lora_b, base, anchor, ctx.scale)
            grad_a = (ctx.scale * (lora_b.float().T @ weighted)).to(lora_a.dtype) if ctx.needs_input_grad[0] else None
            grad_b = (ctx.scale * (weighted @ lora_a.float().T)).to(lora_b.dtype) if ctx.needs_input_grad[1] else None
            grad_base = weighted.to(base.dtype) if ctx.needs_input_grad[2] else None
        return grad_a, grad_b, grad_base, None, None, None


def _lora_diff(lora_a, lora_b, base, anchor, scale):
    return base.float() + scale * (lora_b.float() @ lora_a.float()) - anchor.float()


# ---------------------------------------------------------------------- penalised tensors
@dataclass
class PenalisedTensor:
    """One tensor EWC anchors: a trainable parameter, or the merged weight of a LoRA layer."""

    name: str
    """Plain weight name (``model.layers.0.self_attn.q_proj.weight`` for a LoRA layer)."""
    leaf: torch.Tensor
    """The parameter whose gradient is ∂L/∂(penalised weight): the parameter itself, or the LoRA layer's base weight."""
    layer: Any = None
    adapter: str | None = None
    shard: tuple[int, int] | None = None
    """ZeRO-3 only: (start, length) of this rank's slice of the parameter's flat values."""

    @property
    def is_lora(self) -> bool:
        return self.layer is not None

    def zeros(self) -> torch.Tensor:
        """A float32 zero tensor shaped like what F and θ* hold for this tensor (the local slice under ZeRO-3)."""
        if self.shard is not None:
            return torch.zeros(self.shard[1], dtype=torch.float32, device=self.leaf.ds_tensor.device)
        return torch.zeros_like(self.leaf, dtype=torch.float32)

    def value(self) -> torch.Tensor:
        """θ now (detached; for LoRA the merged weight, merged exactly as the saved state is; under ZeRO-3 the local slice).

        Under ZeRO-3 with LoRA this gathers the layer's factors: a collective, every rank calls it.
        """
        if self.shard is not None:
            if not self.is_lora:
                return self.leaf.ds_tensor.detach().view(-1)[: self.shard[1]]
            lora_a, lora_b = self.lora_factors()
            with zero3_gathered([lora_a, lora_b]):
                return self._merged_local_slice(lora_a, lora_b)
        if not self.is_lora:
            return self.leaf.detach()
        return (self.leaf + self.layer.get_delta_weight(self.adapter).to(self.leaf.dtype)).detach()

    def penalty(self, fisher: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """Σ F (θ − θ*)² (float32), with gradients into the trainable parameters (not under ZeRO-3: see add_ewc_gradients)."""
        if self.shard is not None:
            diff = self.value().float() - anchor.float()
            return (fisher * diff * diff).sum()
        if not self.is_lora:
            return _DiagonalQuadratic.apply(self.leaf, fisher, anchor)
        lora_a, lora_b = self.lora_factors()
        return _LoraQuadratic.apply(lora_a, lora_b, self.leaf, fisher, anchor, float(self.layer.scaling[self.adapter]))

    def lora_factors(self) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        return self.layer.lora_A[self.adapter].weight, self.layer.lora_B[self.adapter].weight

    def _lora_rows(self) -> tuple[int, int, int]:
        """ZeRO-3 LoRA: the rows ``[r0, r1)`` of W the local slice touches, and its offset in them."""
        start, length = self.shard
        columns = int(self.leaf.ds_shape[1])
        first, last = start // columns, (start + max(length, 1) - 1) // columns + 1
        return first, last, start - first * columns

    @torch.no_grad()  # a value: no graph may hold the factors (it would keep the engine alive)
    def _merged_local_slice(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        """ZeRO-3 LoRA: the local slice of ``W₀ + s·B·A`` (factors gathered), from the rows of B it covers only."""
        local = self.leaf.ds_tensor.detach().view(-1)[: self.shard[1]]
        if self.shard[1] == 0:
            return local
        first, last, offset = self._lora_rows()
        block = (lora_b[first:last] @ lora_a) * float(self.layer.scaling[self.adapter])
        return local + block.reshape(-1)[offset : offset + self.shard[1]].to(local.dtype)

    @torch.no_grad()
    def add_lora_shard_gradients(self, fisher: torch.Tensor, anchor: torch.Tensor, coefficient: float) -> None:
        """ZeRO-3 LoRA: add ∂/∂A, ∂/∂B of ``(coefficient/2)·Σ F (W_slice − W*)²`` to A's and B's local gradient partitions.

        A collective (gathers the factors once, sums the partial gradients over the ranks).
        """
        import torch.distributed as dist

        lora_a, lora_b = self.lora_factors()
        scale = float(self.layer.scaling[self.adapter])
        with zero3_gathered([lora_a, lora_b]):
            weighted = coefficient * fisher * (self._merged_local_slice(lora_a, lora_b).float() - anchor.float())
            grad_a = torch.zeros(lora_a.shape, dtype=torch.float32, device=weighted.device)
            grad_b = torch.zeros(lora_b.shape, dtype=torch.float32, device=weighted.device)
            if self.shard[1]:
                first, last, offset = self._lora_rows()
                rows = torch.zeros(last - first, lora_a.shape[1], dtype=torch.float32, device=weighted.device)
                rows.view(-1)[offset : offset + self.shard[1]] = weighted
                grad_a += scale * (lora_b[first:last].float().T @ rows)
                grad_b[first:last] = scale * (rows @ lora_a.float().T)
        for param, full in ((lora_a, grad_a), (lora_b, grad_b)):
            if dist.is_initialized():
                dist.all_reduce(full, group=param.ds_process_group)
            start, length = local_shard(param)
            _add_to_local_grad(param, full.view(-1)[start : start + length])


def _add_to_local_grad(param: torch.nn.Parameter, local: torch.Tensor) -> None:
    """Add ``local`` (this rank's slice of a gradient of ``param``, see :func:`local_shard`) to its ZeRO-3 gradient partition."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    grad = safe_get_local_grad(param)
    if grad is None or local.numel() == 0:
        return
    grad.view(-1)[: local.numel()].add_(local.to(grad.dtype))
    safe_set_local_grad(param, grad)


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


def penalised_tensors(model: torch.nn.Module) -> list[PenalisedTensor]:
    """The tensors EWC penalises in ``model`` (see the module docstring), in a fixed order."""
    model = unwrap_model(model)
    zero3 = is_zero3(model)

    def shard(param: torch.nn.Parameter) -> tuple[int, int] | None:
        return local_shard(param) if zero3 else None

    if not is_peft_model(model):
        return [PenalisedTensor(name, param, shard=shard(param)) for name, param in model.named_parameters() if param.requires_grad]

    terms: list[PenalisedTensor] = []
    handled: set[int] = set()
    for module_name, layer in _lora_layers(model).items():
        adapters = [adapter for adapter in layer.active_adapters if adapter in layer.lora_A]
        if not adapters:
            continue
        if len(adapters) > 1:
            raise CptError(f"ewc: layer {module_name} has {len(adapters)} active LoRA adapters; EWC supports one")
        adapter = adapters[0]
        base = layer.get_base_layer()
        lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if not (lora_a.requires_grad or lora_b.requires_grad):
            continue
        if (
            not isinstance(base, torch.nn.Linear)
            or not base.weight.is_floating_point()
            or getattr(layer, "fan_in_fan_out", False)
            or layer.use_dora.get(adapter, False)
        ):
            raise CptError(
                f"ewc: layer {module_name} is not a plain LoRA linear layer (quantized, Conv1D/fan_in_fan_out or DoRA); "
                "EWC supports LoRA on float nn.Linear layers"
            )
        terms.append(PenalisedTensor(f"{module_name}.weight", base.weight, layer=layer, adapter=adapter, shard=shard(base.weight)))
        handled |= {id(lora_a), id(lora_b), id(base.weight)}
    for name, param in model.get_base_model().named_parameters():
        if param.requires_grad and id(param) not in handled:
            terms.append(PenalisedTensor(name, param, shard=shard(param)))
    return terms


def current_values(terms: Iterable[PenalisedTensor]) -> dict[str, torch.Tensor]:
    """θ* ← the penalised tensors' current values (copies, in the parameters' dtype)."""
    return {term.name: term.value().clone() for term in terms}


def ewc_penalty(
    terms: Sequence[PenalisedTensor],
    fisher: dict[str, torch.Tensor],
    anchors: dict[str, torch.Tensor],
    ewc_lambda: float,
) -> torch.Tensor:
    """(λ/2) Σ_i F_i (θ_i − θ*_i)² over the penalised tensors (METHOD §4), a float32 scalar.

    ``fisher``/``anchors`` must hold every penalised tensor's name, on the tensor's device.
    """
    missing = [term.name for term in terms if term.name not in fisher or term.name not in anchors]
    if missing:
        raise CptError(
            f"ewc: no Fisher/anchor for {len(missing)} trained tensor(s) (e.g. {missing[0]}); "
            "the trainable parameters changed since the Fisher was computed"
        )
    if not terms:
        raise CptError("ewc: the model has no trainable parameters to penalise")
    if terms[0].shard is not None:
        # ZeRO-3: the value only (its gradient goes in through add_ewc_gradients)
        with torch.no_grad():
            local = sum(term.penalty(fisher[term.name], anchors[term.name]) for term in terms)
            return 0.5 * ewc_lambda * sum_over_zero3_ranks(local, terms[0].leaf)
    device = terms[0].leaf.device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for term in terms:
        total = total + term.penalty(fisher[term.name], anchors[term.name]).to(device)
    return 0.5 * ewc_lambda * total


def sum_over_zero3_ranks(value: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """The sum of a per-rank float32 scalar over the ZeRO-3 partition group of ``param``."""
    import torch.distributed as dist

    value = value.detach().float().reshape(())
    if dist.is_initialized():
        dist.all_reduce(value, group=param.ds_process_group)
    return value


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
            term.add_lora_shard_gradients(fisher[term.name], anchors[term.name], scale * ewc_lambda)
        elif term.leaf.requires_grad:
            _add_to_local_grad(term.leaf, (scale * ewc_lambda) * fisher[term.name] * (term.value().float() - anchors[term.name].float()))


# ---------------------------------------------------------------------- the Fisher
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
    flags = [leaf.requires_grad for leaf in leaves]
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
            hooks = [term.leaf.register_hook(_local_square_accumulator(out[term.name], term.shard, 1.0 / len(batches))) for term in terms]
        with torch.enable_grad():
            for batch in batches:
                loss = module(**_to_device(batch, device), use_cache=False).loss
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                if sharded:
                    _release_backward_leftovers(leaves[0])
                else:
                    for term, grad in zip(terms, grads):
                        if grad is not None:
                            out[term.name].addcmul_(grad.float(), grad.float(), value=1.0 / len(batches))
                del grads
    finally:
        for hook in hooks:
            hook.remove()
        for leaf, flag in zip(leaves, flags):
            leaf.requires_grad_(flag)
        module.train(was_training)
    return out


def _release_backward_leftovers(param: torch.nn.Parameter) -> None:
    """Re-partition what this backward gathered but no post-backward hook released.

    DeepSpeed's engine does this at the end of its own backward; a backward outside the
    engine (the Fisher's) must do it too, or the next gather of those parameters fails.
    """
    optimizer = getattr(param, "_z3_optimizer", None)
    if optimizer is not None:
        optimizer.parameter_offload.release_backward_leftovers()


def _local_square_accumulator(target: torch.Tensor, shard: tuple[int, int], weight: float):
    start, length = shard

    def hook(grad: torch.Tensor) -> torch.Tensor:
        local = grad.detach().reshape(-1)[start : start + length].float()
        target.addcmul_(local.to(target.device), local.to(target.device), value=weight)
        return grad.new_zeros(()).expand_as(grad)

    return hook


def fisher_indices(size: int, count: int, seed: int, step: int) -> list[int]:
    """The seeded uniform sample of ``count`` example indices (sorted) the Fisher of task ``step`` uses."""
    if count >= size:
        return list(range(size))
    return sorted(random.Random(f"cpt-ewc-fisher:{seed}:{step}").sample(range(size), count))


# ---------------------------------------------------------------------- persistence
_STEP_DIR = re.compile(r"^step_(\d+)(\.old)?$")


def step_dir(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step_{step}"


def stored_steps(folder: str | Path) -> list[int]:
    """Steps with a complete Fisher/anchors folder (recovering folders left by a kill mid-commit)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    for path in list(folder.iterdir()):
        match = _STEP_DIR.match(path.name)
        if match:
            recover_dir(step_dir(folder, int(match.group(1))))
    return sorted(
        int(match.group(1))
        for path in folder.iterdir()
        if (match := _STEP_DIR.match(path.name)) and not match.group(2) and (path / FISHER_FILE).is_file() and (path / ANCHORS_FILE).is_file()
    )


def save_ewc_state(folder: str | Path, step: int, fisher: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write ``<folder>/step_<step>/{fisher,anchors}.safetensors`` atomically; keep steps ≥ step − 1.

    The previous step is kept so that a task retrained after a kill (between this write and
    the end of its integration) still finds the Fisher and anchors it started from.
    """
    from safetensors.torch import save_file

    final = step_dir(folder, step)
    meta = {key: str(value) for key, value in {**metadata, "step": step}.items()}
    staged = staging_dir(final)
    try:
        save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in fisher.items()}, str(staged / FISHER_FILE), metadata=meta)
        save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in anchors.items()}, str(staged / ANCHORS_FILE), metadata=meta)
        commit_dir(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    for old in stored_steps(folder):
        if old < step - 1:
            shutil.rmtree(step_dir(folder, old), ignore_errors=True)
    return final


def load_ewc_state(folder: str | Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fisher, anchors) stored for ``step`` (on CPU)."""
    from safetensors.torch import load_file

    path = step_dir(folder, step)
    if step not in stored_steps(folder):
        raise CptError(f"ewc: no Fisher/anchors of task {step} in {Path(folder)}; the run directory is incomplete: rerun with --overwrite")
    return load_file(str(path / FISHER_FILE)), load_file(str(path / ANCHORS_FILE))


# ---------------------------------------------------------------------- the strategy
@register_strategy(
    "ewc",
    params=EWCParams,
    train_from="state",
    state_is_expert=True,
    description="sequential fine-tuning with the (online) EWC penalty toward earlier tasks' weights",
)
class EWC(Strategy):
    """Integration is sequential; the training-time work is :class:`callbacks.EWCCallback`."""

    def __init__(self, params: EWCParams):
        self.params = params
        self.callback = None

    def training_callbacks(self, context: TaskContext) -> list:
        from callbacks.ewc import EWCCallback

        self.callback = EWCCallback(
            ewc_lambda=self.params.ewc_lambda,
            gamma=self.params.gamma,
            fisher_examples=self.params.fisher_examples,
            output_dir=Path(context.strategy_dir) / "ewc",
            step=context.step,
            task_name=context.task_name,
        )
        return [self.callback]

    def integrate(self, context: IntegrationContext) -> dict:
        context.write_state_from_model()
        return dict(self.callback.stats) if self.callback is not None else {}


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
