"""GCWM's parameters (METHOD §2's table, plus cpt's documented extensions)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, get_args, get_origin, get_type_hints

from cpt.geometry import MERGING_DEFAULTS

__all__ = ["GCWMParams"]


@dataclass
class GCWMParams:
    """GCWM parameters, names and defaults exactly as in METHOD §2's table.

    Validate untrusted input (recipes, ``--set``) with ``pydantic.TypeAdapter(GCWMParams)``:
    the ``Literal`` fields reject unknown modes and ``__post_init__`` checks ranges (it
    also runs on direct construction, so bad values never reach the math).

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
        step_coef: a number: ``c_t = step_coef · decay^{t−1}`` and
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

    rank: int = MERGING_DEFAULTS["rank"]  # METHOD §1/§2 merging defaults, defined once in cpt.geometry
    energy: float = MERGING_DEFAULTS["energy"]
    eps: float = MERGING_DEFAULTS["eps"]
    metric: Literal["barycenter", "mean"] = "barycenter"
    bary_iters: int = 50
    bary_tol: float = 1e-5
    gate: Literal["conflict", "none"] = "conflict"
    gate_threshold: float = 0.12
    gate_sharpness: float = 12.0
    alpha_min: float = 0.15
    alpha_max: float = 0.95
    skip_tol: float = 0.05
    iters: int = 100
    lr: float = 1e-5
    eig_floor: float = 0.0
    memory: Literal["current_anchor", "all_history"] = "current_anchor"
    memory_size: int = -1
    old_weight: float = 1.0
    new_weight: float = 1.0
    step_coef: float | Literal["norm"] = 0.2
    decay: float = 1.0
    non_target: Literal["base", "task_arithmetic", "average"] = "base"
    history_rank: int = -1

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            hint = hints[f.name]
            options = get_args(hint) if get_origin(hint) is Literal else ()
            if f.name == "step_coef" and isinstance(value, str):
                options = ("norm",)
            if options and value not in options:
                raise ValueError(f"GCWMParams.{f.name} must be one of {options}, got {value!r}")
        problems = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        for name in (
            "energy",
            "eps",
            "bary_tol",
            "gate_threshold",
            "gate_sharpness",
            "alpha_min",
            "alpha_max",
            "skip_tol",
            "lr",
            "eig_floor",
            "old_weight",
            "new_weight",
            "decay",
        ):
            need(math.isfinite(float(getattr(self, name))), f"{name} must be finite")
        need(self.rank >= 1, "rank must be >= 1")
        need(0.0 < self.energy <= 1.0, "energy must be in (0, 1]")
        need(self.eps > 0.0, "eps must be > 0")
        need(self.bary_iters >= 0, "bary_iters must be >= 0")
        need(self.bary_tol >= 0.0, "bary_tol must be >= 0")
        need(0.0 <= self.alpha_min <= self.alpha_max <= 1.0, "need 0 <= alpha_min <= alpha_max <= 1")
        need(0.0 <= self.skip_tol < 0.5, "skip_tol must be in [0, 0.5)")
        need(self.iters >= 0, "iters must be >= 0")
        need(self.lr >= 0.0, "lr must be >= 0")
        need(self.eig_floor >= 0.0, "eig_floor must be >= 0")
        need(self.memory_size == -1 or self.memory_size >= 1, "memory_size must be -1 or >= 1")
        need(self.history_rank == -1 or self.history_rank >= 1, "history_rank must be -1 or >= 1")
        need(self.old_weight >= 0.0, "old_weight must be >= 0 (0 drops m_{t-1})")
        need(self.new_weight > 0.0, "new_weight must be > 0")
        need(self.decay >= 0.0, "decay must be >= 0")
        if self.step_coef == "norm":
            need(self.decay == 1.0, "decay must be 1 with step_coef 'norm' (c_t = n̄_t / ‖m_t‖ has no decay)")
            need(
                self.non_target == "base",
                "step_coef 'norm' needs non_target 'base' (c_t is known only after every target tensor)",
            )
        else:
            need(math.isfinite(float(self.step_coef)), "step_coef must be finite or 'norm'")
        if problems:
            raise ValueError("invalid GCWMParams: " + "; ".join(problems))
