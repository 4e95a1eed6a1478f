"""Geometry diagnostics over whole models: stream target tensors, batch by shape, summarise.

The glue between :mod:`cpt.tensors` (where weights are) and :mod:`cpt.geometry` (the
math of METHOD §1). Used by ``callbacks.GeometryConflictCallback`` at the end of every
task and by ``cpt geometry`` on checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from cpt.geometry import (
    ANALYSIS_DEFAULTS,
    Delta,
    LowRankDelta,
    RightBasis,
    conflict_from_bases,
    frobenius_norm,
    right_basis,
    state_relative_geometry,
)
from cpt.geometry.bases import geometry_worker_threads, gram_path_threads, one_blas_thread, one_thread_worker
from cpt.naming import tensor_depth, tensor_family

#: Bytes of stacked deltas per batch (two operands): bounds memory whatever the model size.
BATCH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class GeometrySettings:
    """METHOD §1 analysis settings; the defaults are :data:`cpt.geometry.ANALYSIS_DEFAULTS` (defined once)."""

    rank: int = ANALYSIS_DEFAULTS["rank"]
    energy: float = ANALYSIS_DEFAULTS["energy"]
    eps: float = ANALYSIS_DEFAULTS["eps"]
    eig_floor: float = 0.0


def _delta_shape(delta: Delta) -> tuple:
    if isinstance(delta, LowRankDelta):
        return ("lora", tuple(delta.lora_B.shape), tuple(delta.lora_A.shape))
    return ("dense", tuple(delta.shape))


def _delta_bytes(delta: Delta) -> int:
    if isinstance(delta, LowRankDelta):
        return delta.lora_B.numel() * 4 + delta.lora_A.numel() * 4
    return delta.numel() * 4


def _stack(deltas: list[Delta]) -> Delta:
    first = deltas[0]
    if isinstance(first, LowRankDelta):
        scales = torch.tensor([float(d.scale) for d in deltas], dtype=torch.float64)
        return LowRankDelta(torch.stack([d.lora_B for d in deltas]), torch.stack([d.lora_A for d in deltas]), scales)
    return torch.stack(deltas)


def _batches(names: list[str], shape_of: Callable[[str], tuple], bytes_of: Callable[[str], int]) -> Iterable[list[str]]:
    """Names grouped by shape, each group cut so a batch stays under ``BATCH_BYTES``."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in names:
        groups[shape_of(name)].append(name)
    for group in groups.values():
        per_item = max(1, bytes_of(group[0]))
        size = max(1, BATCH_BYTES // (2 * per_item))
        for start in range(0, len(group), size):
            yield group[start : start + size]


def _split(batch: list[str], parts: int) -> list[list[str]]:
    """``batch`` cut into at most ``parts`` contiguous shares of near-equal length (same shapes: same cost)."""
    parts = min(parts, len(batch))
    bounds = [round(index * len(batch) / parts) for index in range(parts + 1)]
    return [batch[start:end] for start, end in zip(bounds, bounds[1:]) if end > start]


def _finite(value: torch.Tensor) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def pair_geometry(
    names: list[str],
    delta_a: Callable[[str], Delta],
    delta_b: Callable[[str], Delta],
    settings: GeometrySettings = GeometrySettings(),
    device: str | torch.device = "cpu",
    group_key: Callable[[str], tuple[tuple, int]] | None = None,
    *,
    zero_a: bool = False,
) -> dict[str, dict[str, float | int | None]]:
    """Per tensor: conflict, SAR both ways, norms and ranks of two deltas (METHOD §1).

    ``delta_a(name)``/``delta_b(name)`` load one tensor's delta (dense or LoRA factors)
    on demand; tensors of equal shape are batched. ``a`` plays the state's role in
    :func:`cpt.geometry.state_relative_geometry`, ``b`` the update's. Undefined values
    (a zero delta) are ``None``. ``group_key(name) -> (batching key, bytes)`` says which
    tensors batch together without loading them (default: load both deltas to see).

    On the CPU with more than one torch thread, each batch is cut into one share per thread,
    measured side by side (:func:`cpt.geometry.bases.geometry_worker_threads`; the rows are the
    same bits): the loaders are then called from those worker threads, so they must be safe to
    call concurrently (reading safetensors files or a model's tensors is).

    ``zero_a=True`` says ``a`` is zero for every name (the state at step 1, θ_{t−1} = θ0):
    then the conflict and SAR(a → b) are undefined and SAR(b → a) is 0 whatever ``b`` is,
    so no basis and no Bures solve is computed — only ``‖b‖`` (see :func:`_zero_a_rows`;
    ``rank_b`` and ``union_rank`` are ``None`` there, as they would need ``b``'s basis).
    """
    if zero_a:
        return _zero_a_rows(names, delta_b, device)
    if group_key is None:

        def group_key(name: str) -> tuple[tuple, int]:
            a, b = delta_a(name), delta_b(name)
            return _delta_shape(a) + _delta_shape(b), _delta_bytes(a)

    keys = {name: group_key(name) for name in names}

    def measure_batch(batch: list[str]) -> dict[str, dict]:
        first_a, first_b = delta_a(batch[0]), delta_b(batch[0])
        # Gram-path shapes on the CPU: torch on one thread, the eigensolves concurrent (see gram_path_threads).
        with gram_path_threads([first_a, first_b], settings.rank, device):
            loaded_a = [first_a] + [delta_a(name) for name in batch[1:]]
            loaded_b = [first_b] + [delta_b(name) for name in batch[1:]]
            stacked_a, stacked_b = _to(_stack(loaded_a), device), _to(_stack(loaded_b), device)
            del loaded_a, loaded_b
            out = state_relative_geometry(
                stacked_a, stacked_b, settings.rank, settings.energy, settings.eps, settings.eig_floor
            )
        return {
            name: {
                "geometry_conflict": _finite(out["geometry_conflict"][index]),
                "sar_a_to_b": _finite(out["sar_state_to_update"][index]),
                "sar_b_to_a": _finite(out["sar_update_to_state"][index]),
                "norm_a": float(out["norm_state"][index]),
                "norm_b": float(out["norm_update"][index]),
                "rank_a": int(out["rank_state"][index]),
                "rank_b": int(out["rank_update"][index]),
                "union_rank": int(out["union_rank"][index]),
            }
            for index, name in enumerate(batch)
        }

    batches = list(_batches(names, lambda name: keys[name][0], lambda name: keys[name][1]))
    results: dict[str, dict] = {}
    workers = geometry_worker_threads(device)
    if workers == 1:
        for batch in batches:
            results.update(measure_batch(batch))
    else:
        # Each batch cut into `workers` shares measured side by side, one torch thread each (see
        # geometry_worker_threads): a tensor's numbers do not depend on its batch, and at most
        # `workers` shares (together one batch's size) are loaded at a time.
        def measure_share(share: list[str]) -> dict[str, dict]:
            with one_thread_worker():
                return measure_batch(share)

        shares = [share for batch in batches for share in _split(batch, workers)]
        # scipy's BLAS thread limit is process-wide: set once around the pool, so that no worker's
        # exit from its own limit hands two BLAS threads to another worker's running solve (whose
        # bits then depend on the timing).
        with one_blas_thread(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cpt-geometry") as pool:
            for rows in pool.map(measure_share, shares):
                results.update(rows)
    return {name: results[name] for name in names}


def _zero_a_rows(
    names: list[str], delta_b: Callable[[str], Delta], device: str | torch.device
) -> dict[str, dict[str, float | int | None]]:
    """:func:`pair_geometry`'s rows when ``a = 0``: the same keys, the norms, nothing undefined computed.

    With ``Δ_a = 0`` (METHOD §1): GC needs both bases (undefined), SAR(a → b) = 0/0
    (undefined), SAR(b → a) = ‖Δ_b V_a‖/‖Δ_b‖ with an empty ``V_a`` = 0 where ``Δ_b ≠ 0``.
    """
    rows = {}
    for name in names:
        norm_b = float(frobenius_norm(_to(delta_b(name), device)))
        rows[name] = {
            "geometry_conflict": None,
            "sar_a_to_b": None,
            "sar_b_to_a": 0.0 if norm_b > 0 else None,
            "norm_a": 0.0,
            "norm_b": norm_b,
            "rank_a": 0,
            "rank_b": None,
            "union_rank": None,
        }
    return rows


def right_bases(
    names: list[str],
    delta: Callable[[str], Delta],
    settings: GeometrySettings,
    device: str | torch.device = "cpu",
    group_key: Callable[[str], tuple[tuple, int]] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (V [d_in, r], S [r])}`` at the analysis rank, to keep a task's update compactly."""
    if group_key is None:

        def group_key(name: str) -> tuple[tuple, int]:
            value = delta(name)
            return _delta_shape(value), _delta_bytes(value)

    keys = {name: group_key(name) for name in names}
    bases = {}
    for batch in _batches(names, lambda name: keys[name][0], lambda name: keys[name][1]):
        basis = right_basis(_to(_stack([delta(name) for name in batch]), device), settings.rank, settings.energy)
        for index, name in enumerate(batch):
            rank = int(basis.ranks[index])
            bases[name] = (basis.basis[index, :, :rank].cpu(), basis.singular_values[index, :rank].cpu())
    return bases


def basis_conflict(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], settings: GeometrySettings
) -> float | None:
    """GC between two deltas known only by their kept right bases (METHOD §1)."""

    def as_basis(pair):
        v, s = pair
        v, s = v.to(torch.float64).unsqueeze(0), s.to(torch.float64).unsqueeze(0)
        return RightBasis(v, s, torch.tensor([v.shape[-1]]), s.square().sum(-1))

    if first[0].shape[-1] == 0 or second[0].shape[-1] == 0:
        return None
    conflict, _ = conflict_from_bases(as_basis(first), as_basis(second), settings.eps, settings.eig_floor)
    return _finite(conflict[0])


def _to(delta: Delta, device) -> Delta:
    if isinstance(delta, LowRankDelta):
        scale = delta.scale.to(device) if isinstance(delta.scale, torch.Tensor) else delta.scale
        return LowRankDelta(delta.lora_B.to(device), delta.lora_A.to(device), scale)
    return delta.to(device)


def summarize(per_tensor: dict[str, dict], key: str = "geometry_conflict", top_k: int = 10) -> dict:
    """Aggregates of one per-tensor field: mean, attention vs MLP, per depth, top-k (METHOD §1)."""

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    defined = {name: row[key] for name, row in per_tensor.items() if row.get(key) is not None}
    families: dict[str, list[float]] = defaultdict(list)
    depths: dict[int, list[float]] = defaultdict(list)
    for name, value in defined.items():
        families[tensor_family(name)].append(value)
        depth = tensor_depth(name)
        if depth is not None:
            depths[depth].append(value)
    ranked = sorted(defined.items(), key=lambda item: item[1], reverse=True)[:top_k]
    return {
        "mean": mean(list(defined.values())),
        "count": len(defined),
        "undefined": len(per_tensor) - len(defined),
        "by_family": {family: mean(values) for family, values in sorted(families.items())},
        "by_depth": {str(depth): mean(values) for depth, values in sorted(depths.items())},
        "top": [{"tensor": name, key: value} for name, value in ranked],
    }


def checkpoint_folder(name_or_path: str) -> str:
    """A local folder for an HF checkpoint given as a folder, an asset name or a hub id."""
    from pathlib import Path

    from cpt.assets import resolve_model
    from cpt.errors import CptError

    resolved = resolve_model(name_or_path)
    if Path(resolved).is_dir():
        return resolved
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:
        raise CptError(
            f"checkpoint {name_or_path!r}: not a local folder and not downloadable ({type(exc).__name__}); pass an HF folder"
        ) from None


def checkpoint_geometry(
    base: str,
    checkpoints: list[str],
    settings: GeometrySettings = GeometrySettings(),
    targets: list[str] | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Conflict and SAR between every unordered pair of checkpoints, deltas against ``base``.

    The ``cpt geometry`` command. Tensors are read one batch at a time from safetensors, and
    deltas are formed in float32 whatever the checkpoints' dtype (METHOD §1). A checkpoint
    may be a PEFT LoRA adapter folder over ``base``: its deltas are its factors
    (:class:`~cpt.geometry.LowRankDelta`), never the dense product ``B·A``.
    """
    import itertools

    from cpt.errors import CptError
    from cpt.recipe import DEFAULT_TARGETS
    from cpt.tensors import AdapterExpertWeights, SafetensorsWeights, compile_targets, expert_weights, is_target

    base_weights = SafetensorsWeights(checkpoint_folder(base))
    weights = [expert_weights(checkpoint_folder(path), base_weights) for path in checkpoints]
    patterns = compile_targets(targets or DEFAULT_TARGETS)
    names = [name for name in base_weights.names() if len(base_weights.shape(name)) == 2 and is_target(name, patterns)]
    if not names:
        raise CptError(f"{base}: no target tensors match {targets or DEFAULT_TARGETS}; pass --targets")
    for path, checkpoint in zip(checkpoints, weights):
        missing = [
            name for name in names if name not in checkpoint or checkpoint.shape(name) != base_weights.shape(name)
        ]
        if missing:
            raise CptError(
                f"{path}: {len(missing)} target tensors missing or of another shape than in the base (e.g. {missing[0]}); is it a fine-tune of {base}?"
            )

    def loader(checkpoint) -> Callable[[str], Delta]:
        """One tensor's delta against the base, float32: LoRA factors for an adapter (the dense
        product is never formed, METHOD §1), else the difference of the two folders' tensors."""
        if isinstance(checkpoint, AdapterExpertWeights):
            adapter = checkpoint.adapter

            def adapter_delta(name: str) -> Delta:
                if name not in adapter:  # a target the adapter does not train: a zero update
                    return torch.zeros(tuple(base_weights.shape(name)), dtype=torch.float32)
                lora_b, lora_a, scale = adapter.factors(name)
                return LowRankDelta(lora_b, lora_a, scale)

            return adapter_delta
        return lambda name: checkpoint.get(name).float() - base_weights.get(name).float()

    def kind(checkpoint, name: str) -> tuple[tuple, int]:
        if isinstance(checkpoint, AdapterExpertWeights) and name in checkpoint.adapter:
            shape_b, shape_a = checkpoint.adapter.factor_shapes(name)
            return ("lora", shape_b, shape_a), 4 * (math.prod(shape_b) + math.prod(shape_a))
        shape = tuple(base_weights.shape(name))
        return ("dense", shape), 4 * math.prod(shape)

    def pair_key(first, second) -> Callable[[str], tuple[tuple, int]]:
        def group_key(name: str) -> tuple[tuple, int]:
            (key_a, bytes_a), (key_b, _) = kind(first, name), kind(second, name)
            return key_a + key_b, bytes_a

        return group_key

    pairs = []
    for (i, a), (j, b) in itertools.combinations(enumerate(checkpoints), 2):
        group_key = pair_key(weights[i], weights[j])
        per_tensor = pair_geometry(names, loader(weights[i]), loader(weights[j]), settings, device, group_key)
        summary = summarize(per_tensor, "geometry_conflict")
        pairs.append(
            {
                "a": a,
                "b": b,
                "mean_geometry_conflict": summary["mean"],
                "mean_sar_a_to_b": summarize(per_tensor, "sar_a_to_b")["mean"],
                "mean_sar_b_to_a": summarize(per_tensor, "sar_b_to_a")["mean"],
                "by_family": summary["by_family"],
                "per_tensor": {
                    name: {
                        key: row[key] for key in ("geometry_conflict", "sar_a_to_b", "sar_b_to_a", "norm_a", "norm_b")
                    }
                    for name, row in per_tensor.items()
                },
            }
        )
    return {"base": base, "settings": dataclasses.asdict(settings), "num_tensors": len(names), "pairs": pairs}
