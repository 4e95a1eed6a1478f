"""A content-addressed cache of GCWM's per-tensor merges, shared by study variants whose ``m_t`` agree.

GCWM's merged delta ``m_t`` (METHOD §2, steps 1–7) is a function of its active set (the deltas,
their weights) and of the merge parameters — not of ``step_coef``, ``decay`` or ``non_target``,
which only decide how ``m_t`` moves the state (§2.8, §2.9). In ``current_anchor`` the active set
is ``[m_{t−1}, τ_t]``, so two runs on the same experts whose parameters differ only in those
three fields compute the same chain ``m_1, m_2, …`` — at SmolLM2 scale about ten minutes of
inner Adam solves per step on a 2-core CPU. ``cpt study`` gives such variants one
:class:`GCWMMergeCache` (README, "Studies"): the first run of a seed computes each merge and
stores it, the others read it.

**Key** (per target tensor, :meth:`GCWMMergeCache.key`): the sha256 of the merge parameters
that can change ``m`` (every field but :data:`AFTER_MERGE_FIELDS`), the weights, the solver settings, the platform (device
type, torch version) and every active delta's dtype, shape and bytes. Anything that changes
``m`` changes the key; equal inputs give the bit-identical merge (a tensor's merge does not
depend on the tensors it is batched with).

**Entry**: ``<root>/<key>.safetensors`` — ``merged`` and the per-tensor stats, with the sha256 of
their bytes and the seconds the merge took (its batch's merge time over the batch's tensors) in the
metadata; a run that reads entries adds up those seconds (``seconds_read``), so a study can charge
a reader what its merges cost where they were made. Written to a temporary name and renamed into
place (two writers of one key write the same bytes); read back only when the digest matches, so a
truncated or corrupted entry is recomputed (and replaced), never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .merge import gcwm_merge
from .params import GCWMParams

__all__ = ["AFTER_MERGE_FIELDS", "GCWMMergeCache", "merge_fields", "shares_merges"]

CACHE_FORMAT = 1

#: GCWMParams fields that act after the merge (METHOD §2.8, §2.9): how ``m_t`` moves the state.
#: Every other field is in the key, so a field added later is in it too.
AFTER_MERGE_FIELDS = frozenset({"step_coef", "decay", "non_target"})


def merge_fields(params: GCWMParams) -> dict:
    """The fields of ``params`` that can change ``m_t`` (all but :data:`AFTER_MERGE_FIELDS`)."""
    return {
        field.name: getattr(params, field.name)
        for field in dataclasses.fields(params)
        if field.name not in AFTER_MERGE_FIELDS
    }


def shares_merges(first: GCWMParams, second: GCWMParams) -> bool:
    """Whether two GCWM parameter sets compute the same ``m_t`` chain from the same experts."""
    return merge_fields(first) == merge_fields(second)


def _tensor_bytes(tensor: Tensor) -> bytes:
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(_tensor_bytes(tensors[name]))
    return digest.hexdigest()


class GCWMMergeCache:
    """A drop-in for :func:`cpt.merging.gcwm.gcwm_merge` that reads and stores per-tensor merges.

    Usage::

        cache = GCWMMergeCache("study/merges")
        merged, increment, stats = gcwm_continual_step(t, tau, previous, None, params, merge_fn=cache)

    Args:
        root: the folder of the entries (created on first store).

    A batch is taken from the cache only when every tensor in it is there; otherwise it is merged
    by :func:`gcwm_merge` and each tensor stored. One-delta merges (step 1: ``m = τ_1`` exactly,
    no solve) are computed, not stored. ``hits`` and ``misses`` count tensors; ``seconds_read`` adds
    up the merge seconds recorded in the entries read, ``unpriced`` counts entries read without them.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.seconds_read = 0.0
        self.unpriced = 0
        self.write_failed = False

    def counts(self) -> dict[str, float]:
        """The counters as a record: tensors ``read`` and ``merged``, ``seconds_saved`` (what the entries
        read cost to merge where they were made) and ``unpriced`` (entries read without that record)."""
        return {
            "read": self.hits,
            "merged": self.misses,
            "seconds_saved": round(self.seconds_read, 3),
            "unpriced": self.unpriced,
        }

    def key(
        self,
        deltas: Sequence[Tensor],
        weights: Sequence[float],
        params: GCWMParams,
        settings: dict,
    ) -> str:
        """The key of one tensor's merge: ``deltas`` are that tensor's active deltas ``[d_out, d_in]``."""
        header = {
            "format": CACHE_FORMAT,
            "params": merge_fields(params),
            "weights": [float(weight) for weight in weights],
            "settings": settings,
            "platform": {"device": deltas[0].device.type, "torch": torch.__version__},
            "deltas": [[str(delta.dtype), list(delta.shape)] for delta in deltas],
        }
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for delta in deltas:
            digest.update(_tensor_bytes(delta))
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def read(self, key: str) -> tuple[dict[str, Tensor], float | None] | None:
        """One entry's tensors (``merged``, ``stats.<name>``) and the seconds its merge took (None when
        not recorded), or None when absent or failing its digest."""
        path = self._path(key)
        if not path.exists():
            return None
        try:
            with safe_open(path, "pt") as handle:  # one read: the recorded digest and the tensors
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError):
            tensors, metadata = None, {}
        if tensors is None or metadata.get("sha256") != _digest(tensors):
            path.unlink(missing_ok=True)  # truncated or corrupted: recomputed, never used
            return None
        try:
            seconds = float(metadata["seconds"])
        except (KeyError, ValueError):
            seconds = None
        return tensors, seconds

    def write(self, key: str, tensors: dict[str, Tensor], seconds: float | None = None) -> bool:
        """Store one entry; False (and a warning, once) when it cannot be written — a full disk
        costs the later runs their shortcut, never this run its merge."""
        tensors = {name: value.detach().contiguous().cpu() for name, value in tensors.items()}
        temporary = self.root / f".{key}.{os.getpid()}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            metadata = {"sha256": _digest(tensors), "format": str(CACHE_FORMAT)}
            if seconds is not None:
                metadata["seconds"] = repr(float(seconds))
            save_file(tensors, temporary, metadata=metadata)
            os.replace(temporary, self._path(key))
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            if not self.write_failed:
                warnings.warn(
                    f"GCWM merge cache {self.root}: cannot store a merge ({exc}); merging without it", stacklevel=2
                )
            self.write_failed = True
            return False
        return True

    def __call__(
        self, deltas: Sequence[Tensor], weights: Sequence[float], params: GCWMParams | None = None, **solver
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`gcwm_merge` (same arguments; its keywords — ``adam_dtype``, ``exact_shortcuts``, … —
        are in the key with their defaults filled in), from the cache where every tensor is there."""
        params = params if params is not None else GCWMParams()
        deltas = list(deltas)
        bound = inspect.signature(gcwm_merge).bind(deltas, weights, params, **solver)
        bound.apply_defaults()
        settings = {
            name: str(value) if isinstance(value, torch.dtype) else value
            for name, value in bound.arguments.items()
            if name not in ("deltas", "weights", "params")
        }

        def merge() -> tuple[Tensor, dict[str, Tensor]]:
            return gcwm_merge(deltas, weights, params, **solver)

        if sum(1 for weight in weights if weight > 0) < 2:
            return merge()  # one active delta: m = that delta, nothing to save
        shape = deltas[0].shape
        flat = [delta.reshape(-1, *shape[-2:]) for delta in deltas]
        keys = [
            self.key([delta[index] for delta in flat], weights, params, settings) for index in range(flat[0].shape[0])
        ]
        found = [self.read(key) for key in keys]
        if all(entry is not None for entry in found):
            self.hits += len(keys)
            self.seconds_read += sum(seconds for _, seconds in found if seconds is not None)
            self.unpriced += sum(seconds is None for _, seconds in found)
            entries = [tensors for tensors, _ in found]
            merged = torch.stack([entry["merged"] for entry in entries]).reshape(
                shape[:-2] + entries[0]["merged"].shape
            )
            stats = {
                name.removeprefix("stats."): torch.stack([entry[name] for entry in entries]).reshape(
                    shape[:-2] + entries[0][name].shape
                )
                for name in entries[0]
                if name.startswith("stats.")
            }
            return merged.to(deltas[0].device), {name: value.to(deltas[0].device) for name, value in stats.items()}
        self.misses += len(keys)
        started = time.perf_counter()
        merged, stats = merge()
        seconds = (time.perf_counter() - started) / len(keys)  # a batch's tensors share its solve
        flat_merged = merged.reshape(-1, *merged.shape[-2:])
        flat_stats = {name: value.reshape(len(keys), *value.shape[len(shape) - 2 :]) for name, value in stats.items()}
        for index, key in enumerate(keys):
            self.write(
                key,
                {"merged": flat_merged[index], **{f"stats.{name}": value[index] for name, value in flat_stats.items()}},
                seconds,
            )
        return merged, stats
