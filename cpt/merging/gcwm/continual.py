"""GCWM as a continual method (METHOD §2.8): one step's active set, the step coefficient,
and the rule for non-target tensors. Tensor-in, tensor-out."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .merge import gcwm_merge
from .params import GCWMParams

__all__ = ["gcwm_continual_step", "gcwm_non_target_step", "norm_step_coefficient", "step_coefficient"]


def step_coefficient(step: int, params: GCWMParams) -> float:
    """``c_t = step_coef · decay^{t−1}`` (METHOD §2.8). For ``step_coef: norm`` use
    :func:`norm_step_coefficient` (it needs whole-model norms)."""
    if params.step_coef == "norm":
        raise ValueError("step_coef 'norm' depends on whole-model norms: use norm_step_coefficient")
    return params.step_coef * params.decay ** (step - 1)


def norm_step_coefficient(task_vector_norms: Sequence[float], merged_norm: float) -> tuple[float, float]:
    """``(c_t, n̄_t)`` of ``step_coef: norm`` (METHOD §2.9): ``c_t = n̄_t / ‖m_t‖``.

    ``task_vector_norms``: ``‖τ_1‖ … ‖τ_t‖``; ``merged_norm``: ``‖m_t‖``; all whole-model
    Frobenius norms over the target tensors. ``θ_t = θ0 + c_t m_t`` then has the norm
    ``n̄_t`` of a mean task vector. ``c_t = 0`` when ``m_t = 0`` (every ``c`` gives θ0)."""
    norms = [float(norm) for norm in task_vector_norms]
    if not norms or any(not math.isfinite(norm) or norm < 0 for norm in norms):
        raise ValueError(f"need the finite norms of τ_1..τ_t, got {norms}")
    if not math.isfinite(merged_norm) or merged_norm < 0:
        raise ValueError(f"‖m_t‖ must be finite and >= 0, got {merged_norm}")
    mean_norm = sum(norms) / len(norms)
    return (mean_norm / merged_norm if merged_norm > 0 else 0.0), mean_norm


def gcwm_continual_step(
    step: int,
    task_vector: Tensor,
    previous_merged: Tensor | None,
    history: list[Tensor] | None,
    params: GCWMParams | None = None,
    *,
    adam_dtype: torch.dtype = torch.float32,
    loop_tf32: bool = False,
    exact_shortcuts: bool = True,
    coefficient: float | None = None,
    diagnostics: bool = False,
    merge_fn: Callable[..., tuple[Tensor, dict[str, Tensor]]] | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One continual GCWM step for one (batched) target tensor (METHOD §2.8).

    Args:
        step: t ≥ 1.
        task_vector: ``τ_t = E_t − θ0`` ``[..., d_out, d_in]``.
        previous_merged: ``m_{t−1}``, the previous step's *merged delta* (the unscaled
            output of this function at step t−1, not ``θ_{t−1} − θ0``); must be None at
            t = 1 (``m_0`` is absent) and given for t > 1 (both memory modes need it for
            the increment).
        history: ``all_history`` only: the earlier task vectors ``[τ_1 … τ_{t−1}]`` in
            order, *without* ``τ_t`` (at least the last ``memory_size − 1`` of them when
            ``memory_size > 0``; a longer list is cut to the window). Ignored by
            ``current_anchor``.
        params: :class:`GCWMParams`.
        adam_dtype, loop_tf32, exact_shortcuts, diagnostics: as in :func:`gcwm_merge`.
        coefficient: ``c_t`` to use instead of :func:`step_coefficient`; required for
            ``step_coef: norm``, whose ``c_t = n̄_t/‖m_t‖`` (:func:`norm_step_coefficient`)
            needs every target tensor's ``m_t`` first — the strategy merges with
            ``coefficient=1`` and rescales the state once all tensors are done.
        merge_fn: what merges the active set, with :func:`gcwm_merge`'s signature (default
            :func:`gcwm_merge`), e.g. a :class:`cpt.merging.gcwm.cache.GCWMMergeCache`.

    Active sets: ``current_anchor`` — ``[m_{t−1}, τ_t]`` with weights
    ``(old_weight, new_weight)``, or ``[τ_1]`` (weight ``new_weight``) at t = 1;
    ``all_history`` — ``[τ_1 … τ_t]`` (the last ``memory_size`` when > 0), weights 1.

    Returns:
        ``(m_t, increment, stats)``: ``m_t`` from :func:`gcwm_merge`;
        ``increment = c_t (m_t − m_{t−1})`` with ``m_0 = 0`` and
        ``c_t = step_coef · decay^{t−1}`` — the caller applies
        ``θ_t = θ_{t−1} + increment``; ``stats`` from :func:`gcwm_merge` plus
        ``step_coef`` (``c_t``, float64 scalar).
    """
    params = params if params is not None else GCWMParams()
    if int(step) != step or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step}")
    if step == 1 and previous_merged is not None:
        raise ValueError("previous_merged must be None at step 1 (m_0 is absent)")
    if step > 1 and previous_merged is None:
        raise ValueError(f"previous_merged (m_{{t-1}}) is required at step {step}")
    if previous_merged is not None and previous_merged.shape != task_vector.shape:
        raise ValueError("previous_merged and task_vector must have the same shape")

    if params.memory == "current_anchor":
        if previous_merged is None:
            active, weights = [task_vector], [params.new_weight]
        else:
            active, weights = [previous_merged, task_vector], [params.old_weight, params.new_weight]
    else:
        earlier = list(history) if history is not None else []
        if len(earlier) > step - 1:
            raise ValueError(
                f"history has {len(earlier)} task vectors at step {step}: pass τ_1..τ_(t−1) "
                "without the current task vector"
            )
        needed = step - 1 if params.memory_size < 0 else min(step - 1, params.memory_size - 1)
        if len(earlier) < needed:
            raise ValueError(
                f"all_history at step {step} needs the last {needed} earlier task vectors, got {len(earlier)}"
            )
        active = earlier[len(earlier) - needed :] + [task_vector]
        weights = [1.0] * len(active)

    merged, stats = (merge_fn or gcwm_merge)(
        active,
        weights,
        params,
        adam_dtype=adam_dtype,
        loop_tf32=loop_tf32,
        exact_shortcuts=exact_shortcuts,
        diagnostics=diagnostics,
    )
    if coefficient is None and params.step_coef == "norm":
        raise ValueError("step_coef 'norm': pass coefficient= (c_t = n̄_t/‖m_t‖ needs whole-model norms)")
    c_t = step_coefficient(step, params) if coefficient is None else float(coefficient)
    if previous_merged is None:
        increment = c_t * merged
    else:
        increment = c_t * (merged - previous_merged.to(merged.dtype))
    stats["step_coef"] = torch.tensor(c_t, dtype=torch.float64, device=merged.device)
    return merged, increment, stats


def gcwm_non_target_step(
    step: int,
    task_vector: Tensor,
    previous_state_delta: Tensor | None,
    params: GCWMParams | None = None,
) -> Tensor:
    """New ``θ_t − θ0`` of a non-target tensor under ``params.non_target`` (METHOD §2.8).

    ``previous_state_delta`` is ``θ_{t−1} − θ0`` (None or zeros at t = 1);
    ``task_vector`` is ``τ_t``.

    - ``"base"`` (reference): ``θ_t = θ0`` → zeros;
    - ``"task_arithmetic"``: ``θ_t = θ_{t−1} + c_t τ_t``, ``c_t = step_coef·decay^{t−1}``;
    - ``"average"``: ``θ_t = ((t−1) θ_{t−1} + E_t)/t`` — in deltas
      ``((t−1)(θ_{t−1} − θ0) + τ_t)/t``, the running mean of the task vectors when every
      step used this rule.
    """
    params = params if params is not None else GCWMParams()
    if int(step) != step or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step}")
    previous = previous_state_delta if previous_state_delta is not None else torch.zeros_like(task_vector)
    if params.non_target == "base":
        return torch.zeros_like(task_vector)
    if params.non_target == "task_arithmetic":
        return previous + step_coefficient(step, params) * task_vector
    return ((step - 1) * previous + task_vector) / step
