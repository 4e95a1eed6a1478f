"""What each step's merge did (METHOD §2.10), read from ``integration/<t>_<task>.json``.

Every merge strategy's summary holds ``diagnostics.dev_sum`` (the mean over target tensors
of ``‖m − s‖ / ‖s‖``, and per family) and ``effective_scale`` (``‖θ_t − θ0‖ / n̄_t``) —
recorded by the merge pipeline, or by GCWM itself with its per-branch values. This module
turns them into one row per step and a one-line verdict; runs or steps without them
(training-time strategies, runs made before the diagnostics existed) give no row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cpt.report.loading import RunData

__all__ = ["MergeEffect", "merge_effects", "merge_verdict"]


@dataclass
class MergeEffect:
    """One step's METHOD §2.10 summary."""

    step: int
    task: str
    dev_sum: float | None
    """Mean over target tensors of ``‖m − s‖ / ‖s‖`` (None: not recorded)."""
    dev_sum_by_family: dict[str, float] = field(default_factory=dict)
    effective_scale: float | None = None
    """``‖θ_t − θ0‖ / n̄_t`` over the target tensors (None: not recorded)."""
    branches: dict[str, float] = field(default_factory=dict)
    """GCWM: mean ``dev_sum_relation`` / ``dev_sum_plain`` where computed."""


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def merge_effects(data: RunData) -> list[MergeEffect]:
    """The steps whose integration JSON records dev_sum or an effective scale, in order."""
    effects = []
    for step in sorted(data.integration):
        content = data.integration[step] or {}
        summary = content.get("summary") if isinstance(content, dict) else None
        if not isinstance(summary, dict):
            continue
        diagnostics = summary.get("diagnostics") if isinstance(summary.get("diagnostics"), dict) else {}
        dev_sum = diagnostics.get("dev_sum") if isinstance(diagnostics.get("dev_sum"), dict) else {}
        fallback = data.task_names[step - 1] if 0 < step <= len(data.task_names) else f"task {step}"
        effect = MergeEffect(
            step=step,
            task=str(content.get("task") or fallback),
            dev_sum=_finite(dev_sum.get("mean")),
            dev_sum_by_family={
                key: value for key, value in dev_sum.items() if key != "mean" and _finite(value) is not None
            },
            effective_scale=_finite(summary.get("effective_scale")),
            branches={
                key.removeprefix("dev_sum_"): float(values["mean"])
                for key, values in diagnostics.items()
                if key in ("dev_sum_relation", "dev_sum_plain")
                and isinstance(values, dict)
                and _finite(values.get("mean")) is not None
            },
        )
        if effect.dev_sum is not None or effect.effective_scale is not None:
            effects.append(effect)
    return effects


def merge_verdict(effect: MergeEffect) -> str:
    """E.g. "merge within 2.3 % of plain addition; effective scale 0.41 of a mean task vector"."""
    parts = []
    if effect.dev_sum is not None:
        parts.append(f"merge within {100 * effect.dev_sum:.1f} % of plain addition")
        if effect.branches:
            parts[-1] += " (" + ", ".join(f"{name} branch {100 * v:.1f} %" for name, v in effect.branches.items()) + ")"
    else:
        parts.append("distance from plain addition not recorded")
    if effect.effective_scale is not None:
        parts.append(f"effective scale {effect.effective_scale:.2f} of a mean task vector")
    return "; ".join(parts)
