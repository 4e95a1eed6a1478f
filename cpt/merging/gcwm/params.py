"""GCWM's parameters (METHOD §2's table, plus cpt's documented extensions)."""

from __future__ import annotations

import difflib
import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, FiniteFloat, model_validator
from pydantic.dataclasses import dataclass

from cpt.geometry import MERGING_DEFAULTS

__all__ = ["GCWMParams"]


def _minus_one_or_positive(value: int) -> int:
    if value != -1 and value < 1:
        raise ValueError(f"must be -1 (off) or >= 1, got {value}")
    return value


STEP_COEF_ACCEPTED = "a number in (0, 1] or 'norm'"


def _step_coefficient(value: object) -> float | str:
    """``step_coef``: ``"norm"`` or a number in (0, 1] (a numeric string counts), one error naming both.

    Checked before pydantic's ``float | Literal["norm"]`` union, whose error would name a branch
    (``step_coef.float: unable to parse string as a number``) instead of the accepted values.
    """
    if value == "norm":
        return value
    number = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number) or not 0 < number <= 1:
        close = difflib.get_close_matches(value, ["norm"], n=1, cutoff=0.5) if isinstance(value, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"must be {STEP_COEF_ACCEPTED}, got {value!r}{hint}")
    return number


@dataclass(config=ConfigDict(extra="forbid"))
class GCWMParams:
    """GCWM parameters, names and defaults exactly as in METHOD §2's table.

    A pydantic dataclass: every field's range is in its annotation and the rules that tie
    fields together (``alpha_min <= alpha_max``, ``step_coef: norm``'s needs) are one model
    validator, so recipes (``StrategyInfo.make_params``), ``--set`` and direct construction
    (``GCWMParams(rank=0)`` raises ``pydantic.ValidationError``, a ``ValueError``) all reject
    bad values the same way and they never reach the math.

    Attributes:
        rank: cap on the right-basis rank per delta (§1/§2.1; merging default 16).
        energy: energy threshold of the right basis, in (0, 1] (§1; 0.9).
        eps: covariance ridge ε (§1) — also the eigenvalue floor of inverse roots (§2.2)
            and the metric maps' scale on the complement of the union basis (§2.5).
        metric: shared metric ``B*`` (§2.2): ``"barycenter"`` (W2 fixed point) or
            ``"mean"`` (``Σ ŵ_i B_i``, ablation).
        bary_iters: fixed-point iteration cap (§2.2; 50).
        bary_tol: stop when ``‖B_new − B‖_F / ‖B‖_F < bary_tol`` (§2.2; 1e-5).
        gate: ``"conflict"`` (α from the layer conflict, §2.4) or ``"none"`` (α = 1).
        gate_threshold: the gate centre ``c0`` (§2.4; 0.12).
        gate_sharpness: the gate slope ``s`` (§2.4; 12).
        alpha_min: lower end of the gate range (§2.4; 0.15).
        alpha_max: upper end of the gate range (§2.4; 0.95).
        skip_tol: branch skipping (§2.7): plain branch only when ``α ≤ skip_tol``,
            relation branch only when ``α ≥ 1 − skip_tol`` (METHOD: 0.05 and 0.95).
        iters: Adam iterations of the inner solve (§2.6; 100). The early stop is part of
            the method.
        lr: Adam learning rate of the inner solve (§2.6; 1e-5).
        eig_floor: floor on eigenvalues inside Bures roots (barycenter and conflict);
            0 = exact (§1); the reference merge code uses ε.
        memory: active set of a continual step (§2.8): ``"current_anchor"``
            (``[m_{t−1}, τ_t]``) or ``"all_history"`` (``[τ_1 … τ_t]``).
        memory_size: for ``all_history``, keep the last N task vectors (including
            ``τ_t``); -1 keeps all history.
        old_weight: weight of ``m_{t−1}`` in ``current_anchor`` (1.0; 0 removes it from
            the active set).
        new_weight: weight of ``τ_t`` in ``current_anchor`` (1.0; must be positive).
        step_coef: a number in (0, 1]: ``c_t = step_coef · decay^{t−1}`` and
            ``θ_t = θ_{t−1} + c_t (m_t − m_{t−1})`` (§2.8; reference scripts 0.2, the
            default, so runs stay comparable with the paper). ``"norm"`` (cpt's extension,
            §2.9): ``θ_t = θ0 + c_t m_t`` with ``c_t = n̄_t / ‖m_t‖``, ``n̄_t`` the mean of
            ``‖τ_1‖ … ‖τ_t‖`` and all norms whole-model Frobenius norms over the target
            tensors, so the state keeps the size of one mean task vector however long the
            sequence (0.2 sizes it for five tasks and under-applies every task of a shorter
            sequence). Needs ``decay = 1`` and ``non_target: base`` (the coefficient is
            known only once every target tensor is merged).
        decay: see ``step_coef`` (1.0).
        non_target: what non-target tensors (embeddings, norms, biases, lm_head) become
            (§2.8), applied by :func:`gcwm_non_target_step`:
            ``"base"`` keeps ``θ0`` (the reference); ``"task_arithmetic"`` moves them by
            ``θ_t = θ_{t−1} + c_t τ_t`` (the same ``c_t`` as target tensors);
            ``"average"`` uses the running mean of the experts,
            ``θ_t = θ0 + (1/t) Σ_{s≤t} τ_s`` (weight averaging, METHOD §3).
        history_rank: cpt's extension, not in METHOD's table: keep ``all_history``'s task
            vectors as rank-``history_rank`` factors (their top right singular directions)
            instead of dense, to bound disk and RAM; -1 (default) keeps them dense and
            exact. The relative error ‖τ − τ_r‖/‖τ‖ is reported per tensor.
    """

    rank: Annotated[int, Field(ge=1)] = MERGING_DEFAULTS["rank"]  # METHOD §1/§2 defaults, defined once in cpt.geometry
    energy: Annotated[float, Field(gt=0, le=1)] = MERGING_DEFAULTS["energy"]
    eps: Annotated[float, Field(gt=0, allow_inf_nan=False)] = MERGING_DEFAULTS["eps"]
    metric: Literal["barycenter", "mean"] = "barycenter"
    bary_iters: Annotated[int, Field(ge=0)] = 50
    bary_tol: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-5
    gate: Literal["conflict", "none"] = "conflict"
    gate_threshold: FiniteFloat = 0.12
    gate_sharpness: FiniteFloat = 12.0
    alpha_min: Annotated[float, Field(ge=0, le=1)] = 0.15
    alpha_max: Annotated[float, Field(ge=0, le=1)] = 0.95
    skip_tol: Annotated[float, Field(ge=0, lt=0.5)] = 0.05
    iters: Annotated[int, Field(ge=0)] = 100
    lr: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-5
    eig_floor: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    memory: Literal["current_anchor", "all_history"] = "current_anchor"
    memory_size: Annotated[int, AfterValidator(_minus_one_or_positive)] = -1
    old_weight: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0  # 0 drops m_{t-1}
    new_weight: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    step_coef: Annotated[float | Literal["norm"], BeforeValidator(_step_coefficient)] = 0.2
    decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    non_target: Literal["base", "task_arithmetic", "average"] = "base"
    history_rank: Annotated[int, AfterValidator(_minus_one_or_positive)] = -1

    @model_validator(mode="after")
    def _check_cross_field_rules(self) -> GCWMParams:
        """The rules that tie fields together (single-field ranges live in the annotations above)."""
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min ({self.alpha_min}) must be <= alpha_max ({self.alpha_max})")
        if self.step_coef == "norm" and self.decay != 1.0:
            raise ValueError("decay must be 1 with step_coef 'norm' (c_t = n̄_t / ‖m_t‖ has no decay)")
        if self.step_coef == "norm" and self.non_target != "base":
            raise ValueError("step_coef 'norm' needs non_target 'base' (c_t is known only after every target tensor)")
        return self
