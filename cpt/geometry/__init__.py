"""Update geometry (METHOD.md §1) and the Gaussian W2 barycenter (METHOD.md §2.2).

Pure, batched torch: tensors in, tensors out, no files, no globals. Inputs are batched
over leading dimensions (``[..., d_out, d_in]`` for deltas) and results follow the
input's device; eigendecompositions and roots are float64.

Modules:

- :mod:`cpt.geometry.bases` — right spectral bases (dense or LoRA deltas), union basis,
  projected covariances, norms and products;
- :mod:`cpt.geometry.bures` — PSD roots, Bures–Wasserstein distance, barycenter;
- :mod:`cpt.geometry.conflict` — geometry conflict, SAR, the state-relative signal.
"""

from .bases import (
    Delta,
    LowRankDelta,
    RightBasis,
    apply_right,
    compute_dtype_for,
    frobenius_norm,
    projected_covariance,
    right_basis,
    union_basis,
)
from .bures import (
    bures_wasserstein_sq,
    psd_inv_sqrt,
    psd_sqrt,
    valid_mask,
    wasserstein_barycenter,
)
from .conflict import (
    conflict_from_bases,
    covariance_conflict,
    geometry_conflict,
    state_relative_geometry,
    subspace_alignment_ratio,
)

#: METHOD §1 defaults for diagnostics (analysis).
ANALYSIS_DEFAULTS = dict(rank=32, energy=0.95, eps=1e-6)
#: METHOD §1/§2 defaults for GCWM merging.
MERGING_DEFAULTS = dict(rank=16, energy=0.9, eps=1e-6)

__all__ = [
    "ANALYSIS_DEFAULTS",
    "MERGING_DEFAULTS",
    "Delta",
    "LowRankDelta",
    "RightBasis",
    "apply_right",
    "bures_wasserstein_sq",
    "compute_dtype_for",
    "conflict_from_bases",
    "covariance_conflict",
    "frobenius_norm",
    "geometry_conflict",
    "projected_covariance",
    "psd_inv_sqrt",
    "psd_sqrt",
    "right_basis",
    "state_relative_geometry",
    "subspace_alignment_ratio",
    "union_basis",
    "valid_mask",
    "wasserstein_barycenter",
]
