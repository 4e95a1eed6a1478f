"""The metric modules cpt ships, loaded with ``evaluate`` by path (works offline).

Each metric is an ``evaluate`` metric script at ``cpt/evaluation/metrics/<name>/<name>.py``;
:func:`load_metric` loads it with ``evaluate.load(<folder>)``, never from the Hub.
"""

from __future__ import annotations

import functools
from pathlib import Path

from cpt.errors import CptError

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def available_metrics() -> list[str]:
    """Names of the metric modules shipped with cpt (sorted)."""
    if not METRICS_DIR.is_dir():
        return []
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> Path:
    """Folder of the shipped metric ``name``; :class:`CptError` for an unknown name."""
    known = available_metrics()
    if name not in known:
        raise CptError(f"unknown metric {name!r}; cpt ships: {', '.join(known) or '(none)'}")
    return METRICS_DIR / name


@functools.cache
def load_metric(name: str):
    """Load the shipped metric ``name`` with ``evaluate.load(<its folder>)``; cached per process."""
    path = metric_path(name)
    import evaluate

    return evaluate.load(str(path))


__all__ = ["available_metrics", "load_metric", "metric_path", "METRICS_DIR"]
