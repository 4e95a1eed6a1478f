"""The EWC loss term (METHOD §4): which tensors are penalised, θ*, and (λ/2) Σ F (θ − θ*)².

* :class:`PenalisedTensor` / :func:`penalised_tensors` — every trainable parameter, or under
  PEFT LoRA the merged weight ``W₀ + s·B·A`` of each target layer (why: the package docstring,
  "What is penalised");
* :func:`current_values` — θ* ← the penalised tensors' current values;
* :func:`ewc_penalty` — the penalty, through two autograd functions that save no new tensor
  for the backward pass (θ − θ* is recomputed there, one tensor at a time).

Under ZeRO-3 a tensor holds this rank's slice only; the slice arithmetic is in
:mod:`cpt.training.ewc.zero3`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cpt.errors import CptError
from cpt.tensors import _lora_layers, is_peft_model, is_zero3, unwrap_model
from cpt.training.ewc.zero3 import local_shard, merged_weight_local_slice, sum_over_zero3_ranks

DEFAULT_EWC_LAMBDA = 100.0
"""λ = 100: the order of a completion's token count (why: the package docstring, last paragraph)."""


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
    """W₀ + s·B·A − W* in float32."""
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
            return merged_weight_local_slice(self)
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


def penalised_tensors(model: torch.nn.Module) -> list[PenalisedTensor]:
    """The tensors EWC penalises in ``model`` (see the package docstring), in a fixed order."""
    model = unwrap_model(model)
    zero3 = is_zero3(model)

    def shard(param: torch.nn.Parameter) -> tuple[int, int] | None:
        return local_shard(param) if zero3 else None

    if not is_peft_model(model):
        return [
            PenalisedTensor(name, param, shard=shard(param))
            for name, param in model.named_parameters()
            if param.requires_grad
        ]

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
        terms.append(
            PenalisedTensor(
                f"{module_name}.weight", base.weight, layer=layer, adapter=adapter, shard=shard(base.weight)
            )
        )
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
