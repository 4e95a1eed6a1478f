"""Integration strategies (METHOD.md §2–3): one module per strategy, tensor-in, tensor-out."""

from .gcwm import (  # noqa: F401
    GCWMParams,
    adam_merge,
    gcwm_continual_step,
    gcwm_merge,
    gcwm_non_target_step,
)
