"""Parameter-name conventions shared by diagnostics and reports (no torch import)."""

from __future__ import annotations

import re

_DEPTH = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
_ATTENTION = re.compile(r"(self_attn|attention|attn)\.|\.(q|k|v|o)_proj\.|query|key|value")
_MLP = re.compile(r"(mlp|feed_forward|ffn)\.|\.(gate|up|down)_proj\.")


def tensor_family(name: str) -> str:
    """``attention``, ``mlp`` or ``other`` from a parameter name."""
    if _ATTENTION.search(name):
        return "attention"
    if _MLP.search(name):
        return "mlp"
    return "other"


def tensor_depth(name: str) -> int | None:
    """The block index of a parameter (``model.layers.12.…`` → 12), None outside blocks."""
    match = _DEPTH.search(name)
    return int(match.group(1)) if match else None
