"""GCWM — Geometry-Conflict Wasserstein Merging (METHOD.md §2), data-free.

Where things are:

- :mod:`.params` — :class:`GCWMParams`, the METHOD §2 parameter table;
- :mod:`.merge` — :func:`gcwm_merge` (METHOD §2 steps 1–7 for one active set) and
  :func:`gcwm_geometry` (steps 1–4);
- :mod:`.continual` — :func:`gcwm_continual_step` (METHOD §2.8, both memory modes),
  :func:`step_coefficient`, :func:`gcwm_non_target_step`;
- :mod:`.strategy` — :class:`GCWM`, the strategy registered as ``gcwm``;
- :mod:`.cache` — :class:`GCWMMergeCache`, per-tensor merges shared by runs whose ``m_t`` agree;
- the inner Adam solve of METHOD §2.6 (shared with WUDI) lives in
  :mod:`cpt.merging.inner_solver` and is re-exported here.
"""

from ..inner_solver import adam_merge, inner_gradient, inner_objective
from .cache import GCWMMergeCache, shares_merges
from .continual import gcwm_continual_step, gcwm_non_target_step, norm_step_coefficient, step_coefficient
from .merge import BRANCH_BOTH, BRANCH_PLAIN, BRANCH_RELATION, GCWMGeometry, gcwm_geometry, gcwm_merge
from .params import GCWMParams
from .strategy import GCWM

__all__ = [
    "BRANCH_BOTH",
    "BRANCH_PLAIN",
    "BRANCH_RELATION",
    "GCWM",
    "GCWMGeometry",
    "GCWMMergeCache",
    "GCWMParams",
    "adam_merge",
    "gcwm_continual_step",
    "gcwm_geometry",
    "gcwm_merge",
    "gcwm_non_target_step",
    "inner_gradient",
    "inner_objective",
    "norm_step_coefficient",
    "shares_merges",
    "step_coefficient",
]
