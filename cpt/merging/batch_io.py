"""The file side of merging: stream a model's tensors in batches through a merge rule, write θ_t.

A merge strategy is a per-tensor-batch rule (:mod:`cpt.merging.contract`); this module
does everything else, the same way for every method, so comparisons are fair:

* tensors are read lazily — θ0 and θ_{t−1} from safetensors, E_t from the live model
  (LoRA merged on the fly) — and grouped by shape into batches of bounded size, so the
  extra memory is one batch, whatever the model or the number of tasks;
* a single tensor bigger than one batch (an embedding, say) is split into row blocks when
  the strategy's rule for it is row-separable (:meth:`MergeStrategy.rows_separable`), so
  no operand is ever larger than one batch;
* each batch's new state θ_t is written at once into the state's files, which are laid
  out as ``save_pretrained`` lays out a model (``model.safetensors``, or shards of at most
  ``max_shard_size`` with ``model.safetensors.index.json``; :class:`StreamingShardWriter`),
  so nothing model-sized is held however large a shard is;
* tensors are read and merged in float32 whatever the model's dtype (METHOD §1–§3), and
  θ_t is written in the expert's dtype (a bf16 model's state is bf16);
* freed buffers are handed back to the OS after every batch (:func:`release_freed_host_memory`):
  without it glibc keeps them, and resident memory grows with every tensor read;
* what a strategy keeps across steps (e.g. GCWM's previous merged delta, the task vectors
  of ``all_history``) is stored per step in ``history/step-<t>/<key>/``, shard by shard;
  step t reads ``step-<t−1>`` and older steps are dropped only after θ_t is committed,
  so a kill at any moment resumes consistently;
* scalars a strategy carries (OPCM's λ_t, norms) live in ``history/step-<t>/scalars.json``.

The task vector given to a strategy is ``τ_t = E_t − start`` where ``start`` is the model
the expert trained from: θ0 by default for merge strategies (METHOD's ``τ_t = E_t − θ0``),
or θ_{t−1} when the recipe sets ``strategy.train_from: state`` (then τ_t is this task's
own update, relative to the current state).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cpt import ranks
from cpt.errors import CptError
from cpt.integration import IntegrationContext
from cpt.io import atomic_write_json, commit_dir, staged_dir, staging_dir
from cpt.merging.contract import MergeStrategy, TensorBatch, combine_row_stats, ordered_union
from cpt.merging.merge_diagnostics import StepDiagnostics
from cpt.tensors import (
    _SAFETENSORS_DTYPES,
    STATE_MARKER,
    ModelWeights,
    SafetensorsWeights,
    compile_targets,
    expert_weights,
    is_adapter_folder,
    is_target,
    release_freed_host_memory,
    write_model_files,
)

#: Upper bound on the bytes of one batch of one operand (float32).
BATCH_BYTES = 128 * 2**20
#: A batch of one operand is also at most this fraction of the model (float32). A merge
#: holds a few dozen batch-sized operands at once (θ0, θ_{t−1}, E_t, τ_t, kept tensors, and
#: e.g. GCWM's whitened vectors and Adam states), so 1/64 keeps the working set well under
#: one model's size whatever the model (see benchmarks/merge_memory.py).
BATCH_MODEL_FRACTION = 1 / 64


# ---------------------------------------------------------------------- tensor streaming
class BatchSource:
    """Where the tensors of one integration step are, grouped into equal-shape batches."""

    def __init__(
        self, context: IntegrationContext, device: torch.device, rows_separable: Callable[[bool], bool] | None = None
    ):
        self.context = context
        self.device = device
        self.rows_separable = rows_separable or (lambda target: False)
        self.base = SafetensorsWeights(context.base_dir)
        previous = context.previous_state_dir
        self.previous = (
            SafetensorsWeights(previous)
            if previous is not None and (Path(previous) / STATE_MARKER).exists()
            else self.base
        )
        self.start = self.previous if context.train_from == "state" else self.base
        if context.expert_dir is not None:  # an expert on disk (HF folder or LoRA adapter): read lazily, like θ0
            self.expert = expert_weights(context.expert_dir, self.base)
        else:  # references into the live model (no copy), LoRA adapters merged per tensor on access
            self.expert = ModelWeights(context.model)
        patterns = compile_targets(context.target_patterns)
        self.names = self.base.names()
        missing = [name for name in self.names if name not in self.expert]
        if missing:
            raise ValueError(
                f"the expert has no tensor {missing[0]!r} of the base: is it a fine-tune of {context.base_dir}?"
            )
        self.shapes = {name: self.base.shape(name) for name in self.names}
        self.is_target = {name: len(self.shapes[name]) == 2 and is_target(name, patterns) for name in self.names}
        #: This rank's batches in a multi-process merge (:func:`_run_merge_split`); None: all of them.
        self.share: list[tuple[bool, list[str], slice | None]] | None = None

    def gather(self, compute: Callable[[], Any]) -> list[Any]:
        """Every rank's ``compute()`` (its partial statistics over its :attr:`share`), in rank
        order; ``[compute()]`` in one process. See :func:`cpt.merging.contract.gather_shares`."""
        return ranks.gather_guarded(compute, f"the whole-model pre-pass of task {self.context.step}")

    def dtype(self, name: str) -> torch.dtype:
        """The expert's precision for ``name`` (the new state keeps it)."""
        return self.expert.dtype(name)

    def groups(self) -> list[tuple[bool, list[str], slice | None]]:
        """``(target, names, rows)`` batches: equal-shape tensors of one kind up to the batch
        limit, or row blocks of one tensor above it when the rule is row-separable."""
        grouped: dict[tuple, list[str]] = defaultdict(list)
        for name in self.names:
            grouped[(self.is_target[name], tuple(self.shapes[name]))].append(name)
        limit = batch_limit(self.shapes.values())
        batches = []
        for (target, shape), names in grouped.items():
            per_item = 4 * max(1, math.prod(shape))
            if per_item > limit and len(shape) >= 2 and self.rows_separable(target):
                batches.extend((target, [name], rows) for name in names for rows in row_blocks(shape, limit))
                continue
            size = max(1, limit // per_item)
            batches.extend((target, names[i : i + size], None) for i in range(0, len(names), size))
        return batches

    def load(
        self, names: list[str], rows: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(θ0, θ_{t−1}, E_t, τ_t) for ``names`` (only ``rows`` of them if given), float32 on the merge device
        (a bf16 model's tensors are upcast here: no merge arithmetic runs in bf16)."""

        def stack(tensors):
            return torch.stack([tensor.to(self.device, torch.float32) for tensor in tensors])

        base = stack(read_rows(self.base, name, rows) for name in names)
        state = base if self.previous is self.base else stack(read_rows(self.previous, name, rows) for name in names)
        start = base if self.start is self.base else state
        expert = stack(read_rows(self.expert, name, rows) for name in names)
        return base, state, expert, expert - start

    def iterate(
        self, desc: str | None = None, groups: list[tuple[bool, list[str], slice | None]] | None = None
    ) -> Iterator[tuple[bool, list[str], slice | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(target, names, rows, θ0, θ_{t−1}, E_t, τ_t)`` per batch of ``groups`` (default:
        this rank's :attr:`share`, all of :meth:`groups` in one process), freeing each before the next."""
        from tqdm.auto import tqdm

        if groups is None:
            groups = self.groups() if self.share is None else self.share
        for target, names, rows in tqdm(
            groups, total=len(groups), unit="batch", leave=False, desc=desc, disable=desc is None
        ):
            yield (target, names, rows, *self.load(names, rows))
            self.release()

    def release(self) -> None:
        """Unmap the weight files read for the last batch and return freed buffers to the OS."""
        for weights in (self.base, self.previous, self.expert):
            if isinstance(weights, SafetensorsWeights):
                weights.release()
        release_freed_host_memory()


def read_rows(weights, name: str, rows: slice | None) -> torch.Tensor:
    """``weights[name]`` or only its ``rows``, reading no more than those from disk."""
    if rows is None:
        return weights[name]
    if isinstance(weights, SafetensorsWeights):
        return weights.get_rows(name, rows)
    return weights[name][rows]


def row_blocks(shape, limit: int) -> list[slice]:
    """Consecutive row slices of a tensor of ``shape`` (≥ 1-D), each at most ``limit`` float32 bytes."""
    block = max(1, limit // (4 * max(1, math.prod(shape[1:]))))
    return [slice(start, min(start + block, shape[0])) for start in range(0, shape[0], block)]


def batch_limit(shapes) -> int:
    """Bytes of one operand of one batch (float32): min(BATCH_BYTES, model · BATCH_MODEL_FRACTION)."""
    model_bytes = sum(4 * math.prod(shape) for shape in shapes)
    return max(1, min(BATCH_BYTES, int(model_bytes * BATCH_MODEL_FRACTION)))


class _ShardWriter:
    """Writes a strategy's kept tensors batch by batch into a folder (one file a batch), with an index.

    Internal to ``history/`` (read back only by :class:`_IndexedWeights`). A tensor that
    arrives in row blocks (:meth:`write_rows`) is assembled in one buffer of its own size
    and written as its own shard when its last block arrives.
    """

    def __init__(self, folder: Path, prefix: str):
        self.folder = folder
        self.prefix = prefix
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def write_rows(self, name: str, rows: slice, block: torch.Tensor, shape: torch.Size) -> None:
        buffer, filled = self._pending.get(name, (None, 0))
        if buffer is None:
            buffer = torch.empty(shape, dtype=block.dtype)
        buffer[rows] = block
        filled += rows.stop - rows.start
        if filled < shape[0]:
            self._pending[name] = (buffer, filled)
            return
        self._pending.pop(name, None)
        self.write({name: buffer})

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        file = f"{self.prefix}-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, self.folder / file)
        for name, tensor in tensors.items():
            self.weight_map[name] = file
            self.total += tensor.numel() * tensor.element_size()

    def close(self) -> None:
        if self._pending:
            raise RuntimeError(f"row blocks missing for {sorted(self._pending)[0]}")
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def default_max_shard_size() -> int | str:
    """``save_pretrained``'s default ``max_shard_size`` in the installed transformers ("50GB" in 5.x)."""
    import inspect

    from transformers import PreTrainedModel

    return inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default


def parse_max_shard_size(value: int | str | None, field: str = "max_shard_size") -> int:
    """Bytes of ``value`` ("500MB", "2GiB", an int; None: :func:`default_max_shard_size`), as HF parses it."""
    from cpt.recipe import size_in_bytes

    try:
        return size_in_bytes(default_max_shard_size() if value is None else value)
    except ValueError as exc:
        raise CptError(f"{field}: {exc}") from None


_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


class StreamingShardWriter:
    """θ_t written as ``save_pretrained`` writes a model, one batch at a time.

    The shard plan is HF's own (:func:`huggingface_hub.split_torch_state_dict_into_shards`,
    which ``save_pretrained`` calls), made up front from every tensor's name, shape and
    dtype: ``model.safetensors`` when everything fits in ``max_shard_size``, else
    ``model-0000i-of-0000n.safetensors`` with the standard ``model.safetensors.index.json``.
    Each shard file is created with its safetensors header and its full size, and every
    tensor (or row block of one) is written at its byte offset as it arrives, so nothing
    larger than one batch is ever held, whatever the shard size. (safetensors' own
    ``save_file`` needs every tensor of a file in memory at once; the file format — an
    8-byte little-endian header length, a JSON header padded to 8 bytes, then the raw
    tensors — is what this writes.) :meth:`close` checks every byte of every tensor was
    written.

    Several processes can fill one set of files: one creates them (``create=True``), the
    others attach to them after it (``create=False``: same layout, same plan, nothing
    written until they write tensors) and each writes only its own tensors; once all
    are done, the creator calls ``close(check=False)`` (each writer knows only its own
    writes: check those with :meth:`written_complete`) to write the index.

    Args:
        folder: the (staging) folder to write into.
        layout: ``{name: (shape, dtype)}`` of every tensor, in the order HF should plan shards.
        max_shard_size: e.g. ``"500MB"`` or bytes; None: :func:`default_max_shard_size`.
        create: create the shard files (one writer does); False attaches to files another made.
        index_metadata: more entries for the index's ``metadata`` beside HF's ``total_size``
            (``save_pretrained`` also records ``total_parameters``).
    """

    def __init__(
        self,
        folder: Path,
        layout: dict[str, tuple[torch.Size, torch.dtype]],
        max_shard_size: int | str | None = None,
        create: bool = True,
        index_metadata: dict[str, Any] | None = None,
    ):
        from huggingface_hub import split_torch_state_dict_into_shards

        self.folder = Path(folder)
        self.index_metadata = dict(index_metadata or {})
        self.folder.mkdir(parents=True, exist_ok=True)
        placeholders = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in layout.items()}
        self.plan = split_torch_state_dict_into_shards(
            placeholders, max_shard_size=parse_max_shard_size(max_shard_size)
        )
        #: name -> (file, absolute byte offset of its data, bytes of one row, total bytes)
        self._where: dict[str, tuple[Path, int, int, int]] = {}
        self._written: dict[str, int] = {}
        for file, names in self.plan.filename_to_tensors.items():
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name in names:
                shape, dtype = layout[name]
                nbytes = math.prod(shape) * dtype.itemsize
                header[name] = {
                    "dtype": _DTYPE_NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)
            path = self.folder / file
            if create:
                with open(path, "wb") as handle:
                    handle.write(struct.pack("<Q", len(encoded)))
                    handle.write(encoded)
                    handle.truncate(8 + len(encoded) + offset)
            for name in names:
                shape, dtype = layout[name]
                begin, end = header[name]["data_offsets"]
                row_bytes = (math.prod(shape[1:]) if len(shape) else 1) * dtype.itemsize
                self._where[name] = (path, 8 + len(encoded) + begin, row_bytes, end - begin)
                self._written[name] = 0

    def _put(self, name: str, byte_offset: int, tensor: torch.Tensor) -> None:
        path, start, _, nbytes = self._where[name]
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if byte_offset + data.nbytes > nbytes:
            raise RuntimeError(f"{name}: {data.nbytes} bytes at {byte_offset} overflow its {nbytes} bytes")
        with open(path, "r+b") as handle:
            handle.seek(start + byte_offset)
            handle.write(memoryview(data))
        self._written[name] += data.nbytes

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Whole tensors, each in the dtype and shape of the layout."""
        for name, tensor in tensors.items():
            self._put(name, 0, tensor)

    def write_rows(self, name: str, rows: slice, block: torch.Tensor, shape: torch.Size) -> None:
        """Rows ``rows`` of ``name`` (the layout's dtype)."""
        self._put(name, rows.start * self._where[name][2], block)

    def close(self, check: bool = True) -> None:
        """Check every tensor is complete (``check``: this writer wrote them all); write the
        index when sharded (as ``save_pretrained``). Call on one writer only."""
        for name, (_, _, _, nbytes) in self._where.items() if check else ():
            if self._written[name] != nbytes:
                raise RuntimeError(f"{name}: {self._written[name]} of its {nbytes} bytes were written")
        if self.plan.is_sharded:
            index = {
                "metadata": {**self.index_metadata, **self.plan.metadata},
                "weight_map": self.plan.tensor_to_filename,
            }
            atomic_write_json(self.folder / "model.safetensors.index.json", index)

    def written_complete(self, names: list[str]) -> bool:
        """Whether this writer wrote every byte of ``names`` (its share in a multi-process write)."""
        return all(self._written[name] == self._where[name][3] for name in names)

    def files(self) -> list[Path]:
        return [self.folder / file for file in self.plan.filename_to_tensors]


def rewrite_in_place(file: Path, name: str, rows: slice | None, values: torch.Tensor) -> None:
    """Overwrite ``name`` (or its ``rows``) inside an existing safetensors ``file``, same dtype and shape."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    entry = header[name]
    if _DTYPE_NAMES[values.dtype] != entry["dtype"]:
        raise ValueError(f"{name}: {values.dtype} does not match the file's {entry['dtype']}")
    row_bytes = (math.prod(entry["shape"][1:]) if entry["shape"] else 1) * values.dtype.itemsize
    offset = 8 + length + entry["data_offsets"][0] + (rows.start * row_bytes if rows is not None else 0)
    data = values.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    with open(file, "r+b") as handle:
        handle.seek(offset)
        handle.write(memoryview(data))


class _History:
    """A strategy's kept tensors: ``history/step-<t>/<key>/`` sharded, plus scalars.json."""

    def __init__(self, root: Path):
        self.root = root

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def scalars(self, step: int) -> dict[str, Any]:
        path = self.step_dir(step) / "scalars.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def reader(self, step: int, key: str) -> SafetensorsWeights | None:
        folder = self.step_dir(step) / key
        return _IndexedWeights(folder, key) if (folder / f"{key}.safetensors.index.json").exists() else None

    def prune(self, keep: int) -> None:
        for folder in self.root.glob("step-*"):
            if folder.name != f"step-{keep}":
                shutil.rmtree(folder, ignore_errors=True)


class _IndexedWeights(SafetensorsWeights):
    def __init__(self, folder: Path, prefix: str):
        self.folder = folder
        weight_map = json.loads((folder / f"{prefix}.safetensors.index.json").read_text())["weight_map"]
        self._files = {name: folder / file for name, file in weight_map.items()}
        self._handles = {}


def _merge_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_merge(strategy: MergeStrategy, context: IntegrationContext) -> dict[str, Any]:
    """One integration step of a merge strategy: θ_t written atomically to ``context.state_dir``.

    θ_t and the strategy's kept tensors are built in staging folders; the history of step t
    is committed before θ_t (a kill between the two re-runs step t from θ_{t−1}, which still
    reads step t−1's history), and older history is pruned only after θ_t is committed.

    In a multi-process run (``torch.distributed`` initialised, every rank calling this) the
    batches are divided among the ranks (:func:`_run_merge_split`) when the strategy's rule
    is batch-local or keeps the gather contract (:func:`splits_across_ranks`; every built-in
    strategy does); otherwise the main rank merges alone (and says so) while the others
    return ``{}`` at once.
    """
    rank, world_size = ranks.world()
    if world_size > 1:
        if splits_across_ranks(strategy):
            return _run_merge_split(strategy, context)
        if rank != 0:
            return {}
        ranks.log(
            f"integration of task {context.step} runs on rank 0 only: {type(strategy).__name__} has "
            "whole-model hooks (begin_step/end_step/finalize_scale) and does not declare rank_split = True"
        )
    step = context.step
    source, history, scalars, keys = _open_step(strategy, context)
    readers = {key: history.reader(step - 1, key) for key in keys}
    strategy.begin_step(step, source, scalars)
    diagnostics = _step_diagnostics(strategy, step, scalars)

    with staged_dir(context.state_dir) as staged_state, staged_dir(history.step_dir(step)) as staged_history:
        per_tensor = _merge_batches(
            strategy, context, source, readers, scalars, staged_state, staged_history, diagnostics
        )
        summary = strategy.end_step(step, scalars)
        scale = strategy.finalize_scale(step, scalars)
        if scale is not None:
            _rescale_state(staged_state, source.base, scale)
        if diagnostics is not None:
            _record_diagnostics(diagnostics, scale, summary, per_tensor, scalars)
        _write_step_files(context, scalars, staged_state, staged_history)
    history.prune(keep=step)
    return {"summary": {**summary, "global_scale": scale}, "per_tensor": per_tensor}


#: The hooks whose default (no-op) implementation makes a strategy's step a sum of
#: independent per-batch rules, so the batches may be merged on different ranks.
_WHOLE_MODEL_HOOKS = ("begin_step", "end_step", "finalize_scale")


def splits_across_ranks(strategy: MergeStrategy) -> bool:
    """Whether ``strategy``'s batches may be merged on different ranks with the same result.

    The strategy's class attribute ``rank_split`` decides when set: ``True`` — it keeps the
    gather contract (:class:`~cpt.merging.contract.MergeStrategy`: whole-model quantities
    from exact per-rank partials), ``False`` — its step runs on one rank. Unset: True when
    the strategy keeps the base class's ``begin_step``, ``end_step`` and ``finalize_scale``
    (each batch's θ_t, kept tensors and statistics depend on that batch only; seeded rules
    such as DARE seed per tensor name).
    """
    declared = getattr(type(strategy), "rank_split", None)
    if declared is not None:
        return bool(declared)
    return all(getattr(type(strategy), hook) is getattr(MergeStrategy, hook) for hook in _WHOLE_MODEL_HOOKS)


def rank_shares(
    groups: list[tuple[bool, list[str], slice | None]], shapes: dict[str, torch.Size], world_size: int
) -> list[int]:
    """The rank that merges each batch of ``groups``: balanced by float32 bytes
    (:func:`cpt.ranks.assign_balanced`); the row blocks of one tensor stay on one rank (its
    buffer is assembled there, and per-name quantities accumulate over its blocks)."""
    units: dict[Any, int] = {}  # a batch, or a tensor split into row blocks → its bytes
    unit_of: list[Any] = []
    for index, (_, names, rows) in enumerate(groups):
        unit = ("rows", names[0]) if rows is not None else index
        nbytes = 4 * sum(math.prod(shapes[name]) for name in names)
        if rows is not None:
            nbytes = 4 * (rows.stop - rows.start) * math.prod(shapes[names[0]][1:])
        units[unit] = units.get(unit, 0) + nbytes
        unit_of.append(unit)
    order = list(units)
    owners = dict(zip(order, ranks.assign_balanced([units[unit] for unit in order], world_size), strict=True))
    return [owners[unit] for unit in unit_of]


def _run_merge_split(strategy: MergeStrategy, context: IntegrationContext) -> dict[str, Any]:
    """:func:`run_merge` with the batches divided among the ranks (a collective: every rank calls it).

    1. The main rank creates the staging folders of θ_t and of step t's history next to
       their final homes and broadcasts their paths (ranks share the run directory's
       filesystem), so every rank writes into the same folders.
    2. Each rank runs ``begin_step`` over its share (:func:`rank_shares`, the same on every
       rank; a whole-model pre-pass reduces every rank's partials, see the gather contract
       of :class:`~cpt.merging.contract.MergeStrategy`), merges its batches and writes its own
       shards, ``model-rank<r>-*.safetensors`` and ``<key>/<key>-rank<r>-*.safetensors``,
       each with a per-rank index.
    3. Every rank's per-tensor statistics and the strategy's partial accumulators (or its
       error) are gathered; every rank absorbs the partials and runs ``end_step`` and
       ``finalize_scale``; each applies the main rank's rescale (if any) to its own shards.
    4. The main rank joins the per-rank indexes into ``model.safetensors.index.json`` (and
       each history key's), writes the state folder's other files, commits the history then
       θ_t, prunes older history; a barrier then lets every rank return with θ_t committed.

    If any rank fails at any phase, every rank raises and the staging folders are removed.
    """
    rank, world_size = ranks.world()
    step = context.step
    what = f"integration of task {step}"
    source, history, scalars, keys = _open_step(strategy, context)
    groups = source.groups()
    owners = rank_shares(groups, source.shapes, world_size)
    source.share = [group for group, owner in zip(groups, owners, strict=True) if owner == rank]
    suffix = f"-rank{rank:05d}"

    staged = None
    if rank == 0:
        staged = (str(staging_dir(context.state_dir)), str(staging_dir(history.step_dir(step))))
    staged_state, staged_history = (Path(path) for path in ranks.broadcast_from_main(staged))

    def merge_share() -> tuple[dict, dict, dict | None, Any]:
        started, cpu_started = time.perf_counter(), time.process_time()
        strategy.begin_step(step, source, scalars)  # its pre-pass gathers are collectives
        readers = {key: history.reader(step - 1, key) for key in keys}
        diagnostics = _step_diagnostics(strategy, step, scalars)
        per_tensor = _merge_batches(
            strategy,
            context,
            source,
            readers,
            scalars,
            staged_state,
            staged_history,
            diagnostics=diagnostics,
            groups=source.share,
            suffix=suffix,
        )
        share = {
            "tensors": len({name for _, names, _ in source.share for name in names}),
            "batches": len(source.share),
            "bytes": sum(_group_bytes(group, source.shapes) for group in source.share),
            "seconds": round(time.perf_counter() - started, 3),
            "cpu_seconds": round(time.process_time() - cpu_started, 3),
        }
        accumulators = None if diagnostics is None else diagnostics.accumulators()
        return per_tensor, share, accumulators, strategy.rank_partials()

    ended: dict[str, Any] = {}

    def finish_step() -> float | None:  # the same on every rank: each has the whole step's accumulators
        strategy.absorb_rank_partials([partials for *_, partials in gathered], list(order))
        ended["summary"] = strategy.end_step(step, scalars)
        return strategy.finalize_scale(step, scalars)

    try:
        gathered = ranks.gather_guarded(merge_share, what)
        order = dict.fromkeys(name for _, names, _ in groups for name in names)  # the one-process order
        scale = ranks.gather_guarded(finish_step, what)[0]  # rank 0's, applied by every rank
        summary = ended["summary"]
        if scale is not None:  # each rank rescales the tensors it wrote
            ranks.gather_guarded(
                lambda: _rescale_state(
                    staged_state, source.base, scale, prefix="model" + suffix, limit=batch_limit(source.shapes.values())
                ),
                what,
            )
    except BaseException:
        if rank == 0:
            shutil.rmtree(staged_state, ignore_errors=True)
            shutil.rmtree(staged_history, ignore_errors=True)
        raise

    shares = [share for _, share, _, _ in gathered]
    per_tensor = {}
    for rank_rows, _, _, _ in gathered:
        per_tensor.update(rank_rows)
    per_tensor = {name: per_tensor[name] for name in order if name in per_tensor}

    failure = None
    if rank == 0:
        try:
            ranks.log(ranks.describe_split(what, shares))
            _join_rank_indexes(staged_state, "model", world_size)
            for key_dir in sorted(path for path in staged_history.iterdir() if path.is_dir()):
                _join_rank_indexes(key_dir, key_dir.name, world_size)
            combined = _step_diagnostics(strategy, step, scalars)  # METHOD §2.10 over every rank's tensors
            if combined is not None:  # the ranks' per-tensor sums, keyed in the one-process order
                parts = [accumulators for _, _, accumulators, _ in gathered]
                combined.absorb({key: ordered_union([part[key] for part in parts], order) for key in parts[0]})
                _record_diagnostics(combined, scale, summary, per_tensor, scalars)
            _write_step_files(context, scalars, staged_state, staged_history)
            commit_dir(staged_history, history.step_dir(step))
            commit_dir(staged_state, context.state_dir)
            history.prune(keep=step)
        except BaseException as exc:  # noqa: BLE001 - the other ranks wait for the verdict below
            failure = exc
            shutil.rmtree(staged_state, ignore_errors=True)
            shutil.rmtree(staged_history, ignore_errors=True)
    verdict = ranks.broadcast_from_main(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if verdict is not None:
        raise RuntimeError(f"{what}: rank 0 failed while committing: {verdict}")
    if rank != 0:
        return {}
    return {"summary": {**summary, "global_scale": scale, "ranks": shares}, "per_tensor": per_tensor}


def _group_bytes(group: tuple[bool, list[str], slice | None], shapes: dict[str, torch.Size]) -> int:
    _, names, rows = group
    if rows is not None:
        return 4 * (rows.stop - rows.start) * math.prod(shapes[names[0]][1:])
    return 4 * sum(math.prod(shapes[name]) for name in names)


def _join_rank_indexes(folder: Path, prefix: str, world_size: int) -> None:
    """``<prefix>.safetensors.index.json`` from the per-rank ``<prefix>-rank<r>.safetensors.index.json``
    (which are removed): one HF index over every rank's shards."""
    weight_map: dict[str, str] = {}
    total = 0
    for rank in range(world_size):
        path = folder / f"{prefix}-rank{rank:05d}.safetensors.index.json"
        if not path.exists():  # this rank kept nothing under this key
            continue
        index = json.loads(path.read_text())
        weight_map.update(index["weight_map"])
        total += int(index.get("metadata", {}).get("total_size", 0))
        path.unlink()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_json(folder / f"{prefix}.safetensors.index.json", index)


def _open_step(strategy: MergeStrategy, context: IntegrationContext):
    """What step t reads: the streamed tensors, the kept history, step t−1's carried scalars
    and the history keys the strategy reads (one process or one rank alike)."""
    source = BatchSource(context, _merge_device(), rows_separable=strategy.rows_separable)
    history = _History(context.history_dir)
    scalars = history.scalars(context.step - 1)
    return source, history, scalars, strategy.history_keys(context.step, scalars)


def _save_pretrained_name_order(names: list[str]) -> list[str]:
    """Tensor names in the order transformers 5 plans shards for Llama-like models (``layers.2``
    before ``layers.10``: ``dot_natural_key``), so a sharded state splits where ``save_pretrained``
    splits it. The base folder's own order is alphabetical (safetensors sorts its keys); with no
    model at hand, the natural order is the one transformers uses whenever a model has weight
    conversions to revert, as the Llama family does (cpt.tensors.save_pretrained_order asks the
    model itself, for the ZeRO-3 save). One shard (the default size) is the same either way."""
    try:
        from transformers.core_model_loading import dot_natural_key
    except ImportError:  # transformers 4 keeps the state_dict order, which cpt cannot see here
        return list(names)
    return sorted(names, key=dot_natural_key)


def _write_step_files(
    context: IntegrationContext, scalars: dict[str, Any], staged_state: Path, staged_history: Path
) -> None:
    """The files of step t besides the tensors: the carried scalars, θ_t's config, tokenizer and marker."""
    atomic_write_json(staged_history / "scalars.json", scalars)
    write_model_files(
        staged_state,
        model=context.model,
        config_from=_config_folder(context),
        tokenizer=context.tokenizer,
        marker=context.marker(),
    )


def _config_folder(context: IntegrationContext) -> Path | None:
    """Where θ_t's ``config.json`` comes from when there is no live model: the expert's
    folder, or θ0's when the expert is a LoRA adapter (which has none)."""
    if context.expert_dir is not None and is_adapter_folder(context.expert_dir):
        return context.base_dir
    return context.expert_dir


def _merge_batches(
    strategy: MergeStrategy,
    context: IntegrationContext,
    source: BatchSource,
    readers: dict[str, SafetensorsWeights | None],
    scalars: dict[str, Any],
    staged_state: Path,
    staged_history: Path,
    diagnostics: StepDiagnostics | None = None,
    groups: list[tuple[bool, list[str], slice | None]] | None = None,
    suffix: str = "",
) -> dict[str, dict]:
    """Run the rule over every batch (or only ``groups``), writing θ_t and the kept tensors
    shard by shard (file and index names ``model<suffix>``, ``<key><suffix>``); returns the
    per-tensor statistics (``diagnostics`` observes the target batches)."""
    step, device = context.step, source.device
    if suffix:  # one rank's share of a split merge: its own shards, joined into one index by rank 0
        state_writer = _ShardWriter(staged_state, "model" + suffix)
    else:
        layout = {name: (source.shapes[name], source.dtype(name)) for name in _save_pretrained_name_order(source.names)}
        state_writer = StreamingShardWriter(staged_state, layout, getattr(context, "max_shard_size", None))
    history_writers: dict[str, _ShardWriter] = {}
    per_tensor: dict[str, dict] = {}
    row_stats: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for target, names, rows, base, state, expert, task_vector in source.iterate(
        desc=f"integrate {context.task_name}", groups=groups
    ):
        kept = {
            key: (
                torch.stack([read_rows(reader, name, rows).to(device, torch.float32) for name in names])
                if reader is not None and all(name in reader for name in names)
                else None
            )
            for key, reader in readers.items()
        }
        batch = TensorBatch(names, target, step, base, state, expert, task_vector, kept, scalars, rows)
        result = strategy.merge(batch)
        new_state = result.state.to(torch.float32)
        if not torch.isfinite(new_state).all():
            raise FloatingPointError(f"{strategy.__class__.__name__} produced non-finite values for {names[0]}")
        if diagnostics is not None and target:
            diagnostics.observe(names, base, state, new_state, task_vector)
        _write(state_writer, names, rows, new_state.cpu(), source.shapes, dtype=source.dtype)
        for key, tensors in result.history.items():
            writer = history_writers.setdefault(key, _ShardWriter(staged_history / key, key + suffix))
            _write(writer, names, rows, tensors.to(torch.float32).cpu(), source.shapes)
        for i, name in enumerate(names):
            entry = result.stats[i] if result.stats else {}
            if rows is None:
                per_tensor[name] = {"target": target, **entry}
            else:
                per_tensor[name] = {"target": target}
                row_stats[name].append((rows.stop - rows.start, entry))
        del batch, result, new_state, kept
        for reader in readers.values():
            if reader is not None:
                reader.release()
    for name, blocks in row_stats.items():
        per_tensor[name].update(row_blocks=len(blocks), **combine_row_stats(blocks))
    state_writer.close()
    for writer in history_writers.values():
        writer.close()
    return per_tensor


def _step_diagnostics(strategy: MergeStrategy, step: int, scalars: dict[str, Any]) -> StepDiagnostics | None:
    """What the merge did (METHOD §2.10), for any strategy that does not record it itself."""
    weights = strategy.plain_sum_weights(step)
    if weights is None:
        return None
    return StepDiagnostics(step, weights, scalars.get(StepDiagnostics.CARRIED_KEY))


def _record_diagnostics(
    diagnostics: StepDiagnostics,
    scale: float | None,
    summary: dict[str, Any],
    per_tensor: dict[str, dict],
    scalars: dict[str, Any],
) -> None:
    """Adds dev_sum and the effective scale to the per-tensor rows and the step's summary
    (a strategy's own keys win) and carries the task-vector norms to step t+1."""
    rows, step_summary = diagnostics.finish(scale)
    for name, row in rows.items():
        for key, value in row.items():
            per_tensor.setdefault(name, {}).setdefault(key, value)
    nested = summary.setdefault("diagnostics", {})
    for key, value in step_summary.pop("diagnostics").items():
        nested.setdefault(key, value)
    for key, value in step_summary.items():
        summary.setdefault(key, value)
    scalars[StepDiagnostics.CARRIED_KEY] = diagnostics.carried()


def _write(
    writer: _ShardWriter | StreamingShardWriter,
    names: list[str],
    rows: slice | None,
    values: torch.Tensor,
    shapes: dict[str, torch.Size],
    dtype: Callable[[str], torch.dtype] | None = None,
) -> None:
    """Write a batch's ``values`` (float32), each tensor cast to ``dtype(name)`` when given
    (the state keeps the expert's precision: a bf16 model's state is bf16)."""

    def cast(name: str, value: torch.Tensor) -> torch.Tensor:
        return value if dtype is None else value.to(dtype(name))

    if rows is None:
        writer.write({name: cast(name, values[i]) for i, name in enumerate(names)})
    else:
        writer.write_rows(names[0], rows, cast(names[0], values[0]), shapes[names[0]])


def _rescale_state(
    folder: Path, base: SafetensorsWeights, scale: float, prefix: str = "model", limit: int | None = None
) -> None:
    """θ_t ← θ0 + s·(θ_t − θ0), tensor by tensor, in place in the written shards (OPCM's
    norm-preserving rescale): those of ``model.safetensors`` (or its index), or with another
    ``prefix`` those a ``<prefix>.safetensors.index.json`` names (one rank's, in a split merge).

    Each tensor is rescaled in row blocks of at most ``limit`` bytes (default: one batch,
    :func:`batch_limit`) and written back at its own bytes (:func:`rewrite_in_place`), so
    however large a shard is, no more than one batch is held.
    """
    staged = SafetensorsWeights(folder) if prefix == "model" else _IndexedWeights(folder, prefix)
    if limit is None:
        limit = batch_limit(staged.shape(name) for name in staged.names())
    for name in staged.names():
        shape, dtype, file = staged.shape(name), staged.dtype(name), staged._files[name]
        for rows in row_blocks(shape, limit) if len(shape) else [None]:
            value, theta0 = (read_rows(weights, name, rows).to(torch.float32) for weights in (staged, base))
            staged.release()
            rewrite_in_place(file, name, rows, (theta0 + scale * (value - theta0)).to(dtype))
        release_freed_host_memory()
