"""Conflict vs forgetting (the claim of METHOD §1): the (step, earlier task) pairs and their Spearman correlations.

**Pairs.** One pair per (step t, earlier task j) with 2 ≤ t ≤ k (k = tasks evaluated so
far) and 1 ≤ j < t, when both R[t−1][j] and R[t][j] are present:

* ``y = R[t−1][j] − R[t][j]`` — the drop in task j's score caused by step t (positive =
  forgetting; row 0 is the base, so at t = 2, j = 1 this is R[1][1] − R[2][1]);
* ``x = c_t``, the mean over target tensors of the state-relative conflict
  ``GC(θ_{t−1} − θ0, Δ_t)`` of step t (``aggregates.geometry_conflict.mean`` of
  ``geometry/<t>_<task>.json``, or the mean of its defined per-tensor values);
* for the ``‖Δ‖`` baseline, ``x = n_t``, the mean over target tensors of ``‖Δ_t‖_F``
  (``aggregates.norm_update.mean``, or the per-tensor mean);
* for the SAR baseline, ``x = s_t``, the mean over target tensors of
  ``SAR(Δ_t → θ_{t−1} − θ0)`` (METHOD §1; ``aggregates.sar_update_to_state.mean``, or the
  per-tensor mean) — how much of the update lies in the state's subspace.

**Correlations.** Spearman's ρ and its two-sided p-value are ``scipy.stats.spearmanr(x, y)``
over the pairs whose x is defined (each signal separately; both come from the same geometry
file, so the pairs normally coincide). All pairs of one step share its x, so x has ties;
scipy ranks ties by their average. Fewer than :data:`MIN_PAIRS` pairs → "not enough
points"; a constant x or y → ρ undefined.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from cpt.report.loading import StepGeometry

MIN_PAIRS = 3
"""Fewest pairs Spearman's ρ is computed on."""


@dataclass
class ForgettingPair:
    """One (step t, earlier task j) point of the conflict-vs-forgetting test (module docstring)."""

    step: int
    """t: the step whose update is measured."""
    task: int
    """j < t: the earlier task (1-based)."""
    drop: float
    """R[t−1][j] − R[t][j]."""
    conflict: float | None
    """x = c_t, step t's mean state-relative conflict (``None``: no geometry for step t)."""
    norm: float | None
    """x = n_t, step t's mean ‖Δ_t‖_F (the baseline signal)."""
    sar: float | None = None
    """x = s_t, step t's mean SAR(Δ_t → θ_{t−1} − θ0) (a second baseline; ``None`` when not recorded)."""


@dataclass
class Correlation:
    """Spearman's ρ of ``n`` pairs and its two-sided p-value, or why ρ is undefined."""

    n: int
    rho: float | None = None
    pvalue: float | None = None
    reason: str | None = None
    """Why ρ is undefined (``None`` when it is defined)."""

    def describe(self) -> str:
        if self.rho is None:
            return f"{self.reason} (n = {self.n})"
        return f"ρ = {self.rho:.4f}, p = {self.pvalue:.4g} (n = {self.n})"


def forgetting_pairs(rows: Sequence[Sequence[float | None]], geometry: dict[int, StepGeometry]) -> list[ForgettingPair]:
    """The (step, earlier task) pairs defined in the module docstring, in step then task order."""
    pairs = []
    for t in range(2, len(rows)):
        step_geometry = geometry.get(t)
        conflict = step_geometry.mean_conflict if step_geometry else None
        norm = step_geometry.mean_norm if step_geometry else None
        sar = getattr(step_geometry, "mean_sar", None) if step_geometry else None
        for j in range(1, t):
            before, after = rows[t - 1][j - 1], rows[t][j - 1]
            if before is None or after is None:
                continue
            pairs.append(ForgettingPair(t, j, before - after, conflict, norm, sar))
    return pairs


def spearman(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """``scipy.stats.spearmanr`` with the report's rules: n ≥ 3, non-constant inputs."""
    n = len(x)
    if n < MIN_PAIRS:
        return Correlation(n, reason=f"not enough points: {MIN_PAIRS} pairs needed")
    if len(set(x)) < 2 or len(set(y)) < 2:
        which = "the signal" if len(set(x)) < 2 else "the forgetting"
        return Correlation(n, reason=f"undefined: {which} is constant across the pairs")
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = spearmanr(x, y)
    rho, pvalue = float(result.statistic), float(result.pvalue)
    if not math.isfinite(rho):
        return Correlation(n, reason="undefined")
    return Correlation(n, rho, pvalue)


#: The step signals a pair carries (:class:`ForgettingPair` fields): the conflict and its two baselines.
SIGNALS = ("conflict", "norm", "sar")


def signal_points(pairs: Sequence[ForgettingPair], signal: str) -> tuple[list[float], list[float]]:
    """``(x, y)`` of the pairs whose ``signal`` (one of :data:`SIGNALS`) is defined: x the signal, y the drop."""
    if signal not in SIGNALS:
        raise ValueError(f"signal {signal!r} is not one of {SIGNALS}")
    used = [(getattr(pair, signal), pair.drop) for pair in pairs if getattr(pair, signal) is not None]
    return [x for x, _ in used], [y for _, y in used]


def correlations(
    pairs: Sequence[ForgettingPair], signals: Sequence[str] = ("conflict", "norm")
) -> dict[str, Correlation]:
    """Spearman of the drop against each of ``signals`` (default: the step's mean conflict and its mean ‖Δ‖)."""
    by_signal = {}
    for key in signals:
        used = [(getattr(pair, key), pair.drop) for pair in pairs if getattr(pair, key) is not None]
        by_signal[key] = spearman([x for x, _ in used], [y for _, y in used])
    return by_signal
