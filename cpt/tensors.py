"""Named access to the weights of the base θ0, the state θ_{t−1} and the expert E_t.

Only this module knows where weights live: in a live (possibly PEFT-wrapped) module, or
in safetensors files on disk, read one tensor at a time so that memory does not grow
with the number of models involved. Everyone else asks for tensors by their plain
parameter names (``model.layers.0.self_attn.q_proj.weight``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from cpt.errors import CptError

STATE_MARKER = "cpt_state.json"


# ---------------------------------------------------------------------- target selection
def compile_targets(patterns: Iterable[str]) -> list[re.Pattern]:
    return [re.compile(pattern) for pattern in patterns]


def is_target(name: str, patterns: list[re.Pattern], tensor: torch.Tensor | None = None) -> bool:
    """A target tensor (METHOD §1) matches a pattern and, when given, is 2-D."""
    if tensor is not None and tensor.ndim != 2:
        return False
    return any(pattern.search(name) for pattern in patterns)


# ---------------------------------------------------------------------- live models
def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/accelerate wrappers (``.module``), keeping a PEFT wrapper if present."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(unwrap_model(model), PeftModel)


def _lora_layers(peft_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    return {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}


def lora_factors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{weight name: (lora_B, lora_A, scale)}`` of the active adapter, Δ = scale·B@A."""
    model = unwrap_model(model)
    if not is_peft_model(model):
        return {}
    factors = {}
    for module_name, layer in _lora_layers(model).items():
        adapter = layer.active_adapters[0]
        if adapter not in layer.lora_A:
            continue
        factors[f"{module_name}.weight"] = (
            layer.lora_B[adapter].weight.detach(),
            layer.lora_A[adapter].weight.detach(),
            float(layer.scaling[adapter]),
        )
    return factors


class ModelWeights:
    """A live model's full weights under plain names, one tensor at a time (like :class:`SafetensorsWeights`).

    Plain models: references to the module's tensors (no copy). PEFT LoRA: ``W + ΔW`` is
    computed when a weight is asked for, so at most one merged tensor exists per access
    and the live module (and its adapter) is left untouched for the training script. A
    merged weight comes in float32 (or wider) whatever the model's dtype, so a bf16
    model's update is not rounded away before the merge; :meth:`dtype` is the model's.
    """

    def __init__(self, model: torch.nn.Module):
        model = unwrap_model(model)
        self._tensors: dict[str, torch.Tensor] = {}
        self._lora: dict[str, torch.nn.Module] = {}
        if not is_peft_model(model):
            self._tensors = {name: tensor.detach() for name, tensor in model.state_dict().items()}
            return
        layers = _lora_layers(model)
        for name, tensor in model.get_base_model().state_dict().items():
            if "lora_" in name or "lora_magnitude" in name:
                continue
            if ".base_layer." in name:
                module_name, _, leaf = name.rpartition(".base_layer.")
                name = f"{module_name}.{leaf}"
                if leaf == "weight" and module_name in layers:
                    self._lora[name] = layers[module_name]
            self._tensors[name] = tensor.detach()

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def shape(self, name: str) -> torch.Size:
        return self._tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        layer = self._lora.get(name)
        if layer is None:
            return self._tensors[name]
        weight = self._tensors[name]
        return merged_lora_weight(layer, weight, torch.promote_types(weight.dtype, torch.float32))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return ((name, self[name]) for name in self._tensors)


def merged_lora_weight(layer: torch.nn.Module, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W + ΔW`` of a LoRA layer (every active adapter), a new detached tensor; the layer is left as it is.

    The sum is formed in float32 (at least) and returned in ``dtype`` (default: W's). A bf16
    W + ΔW rounded to bf16 loses most of a small update (METHOD §1 computes in float32/64),
    so readers that merge ask for float32; writers of a state ask for the model's dtype.
    """
    compute = torch.promote_types(weight.dtype, torch.float32)
    delta = torch.zeros(weight.shape, dtype=compute, device=weight.device)
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            delta += layer.get_delta_weight(adapter).to(compute)
    return (weight.to(compute) + delta).to(dtype or weight.dtype).detach()


def model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The expert's full weights under plain names, one tensor at a time (see :class:`ModelWeights`)."""
    return ModelWeights(model).items()


def is_zero3(model: torch.nn.Module) -> bool:
    """True when the model's parameters are partitioned by DeepSpeed ZeRO-3."""
    return any(hasattr(param, "ds_id") for param in unwrap_model(model).parameters())


def zero3_gathered(params: list[torch.nn.Parameter]):
    """Full values of ZeRO-3 partitioned ``params`` inside the block (a collective: every rank enters)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class _Zero3Entry(NamedTuple):
    name: str
    """Plain name (``model.layers.0.self_attn.q_proj.weight``)."""
    shape: torch.Size
    """Full shape (not this rank's partition)."""
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    """The full tensor as a CPU copy; call only while its group is gathered."""
    is_parameter: bool
    """A parameter of the written model (counted in ``total_parameters``), not a buffer."""


class _Zero3Group(NamedTuple):
    """Tensors of a ZeRO-3 model gathered together: one module's own parameters (a LoRA layer whole)."""

    params: list[torch.nn.Parameter]
    """What to gather (may be empty: a module with buffers only)."""
    entries: list[_Zero3Entry]


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().cpu()


def _merged_lora_cpu(layer: torch.nn.Module) -> torch.Tensor:
    return merged_lora_weight(layer, layer.base_layer.weight).cpu()


def _full_shape(param: torch.Tensor) -> torch.Size:
    return torch.Size(getattr(param, "ds_shape", param.shape))


def _zero3_groups(model: torch.nn.Module) -> list[_Zero3Group]:
    """A ZeRO-3 model's tensors under plain names, in ``state_dict`` order, grouped for gathering.

    Nothing is gathered here: full shapes come from DeepSpeed's ``ds_shape``, so the whole
    layout of a written folder is known before the first collective. A LoRA layer is one
    group whose weight is read merged (W + ΔW, in W's dtype); a parameter tied to an
    earlier one (``lm_head`` to the embedding) is left out, as ``save_pretrained`` leaves it.
    """
    from peft.tuners.lora import LoraLayer

    model = unwrap_model(model)
    root = model.get_base_model() if is_peft_model(model) else model
    seen: set[int] = set()
    skip_prefixes: list[str] = []
    groups: list[_Zero3Group] = []
    for module_name, module in root.named_modules():
        if any(module_name.startswith(prefix) for prefix in skip_prefixes):
            continue
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, LoraLayer):
            skip_prefixes.append(prefix)
            params = list(module.parameters())
            base = module.base_layer
            entries = [
                _Zero3Entry(
                    f"{prefix}weight",
                    _full_shape(base.weight),
                    base.weight.dtype,
                    functools.partial(_merged_lora_cpu, module),
                    True,
                )
            ]
            if getattr(base, "bias", None) is not None:
                entries.append(
                    _Zero3Entry(
                        f"{prefix}bias",
                        _full_shape(base.bias),
                        base.bias.dtype,
                        functools.partial(_cpu_copy, base.bias),
                        True,
                    )
                )
            groups.append(_Zero3Group(params, entries))
            seen.update(id(param) for param in params)
            continue
        params = [(name, param) for name, param in module.named_parameters(recurse=False) if id(param) not in seen]
        seen.update(id(param) for _, param in params)
        entries = [
            _Zero3Entry(f"{prefix}{name}", _full_shape(param), param.dtype, functools.partial(_cpu_copy, param), True)
            for name, param in params
        ]
        entries += [
            _Zero3Entry(f"{prefix}{name}", buffer.shape, buffer.dtype, functools.partial(_cpu_copy, buffer), False)
            for name, buffer in module.named_buffers(recurse=False)
            if buffer is not None and name not in module._non_persistent_buffers_set
        ]
        if entries:
            groups.append(_Zero3Group([param for _, param in params], entries))
    return groups


def zero3_tensor_layout(model: torch.nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """``{plain name: (full shape, dtype)}`` of what :func:`zero3_named_tensors` yields, in its order; no collective."""
    return {entry.name: (entry.shape, entry.dtype) for group in _zero3_groups(model) for entry in group.entries}


def zero3_named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Full expert tensors of a ZeRO-3 model under plain names, gathered one module at a time.

    A collective: every rank must iterate it to the end in the same order; the values
    yielded are CPU copies (use them on the main process, ignore them elsewhere). A LoRA
    layer is gathered whole and yielded merged (W + ΔW). Tied parameters come once. The
    order is ``state_dict``'s (:func:`zero3_tensor_layout`).
    """
    for group in _zero3_groups(model):
        gathered = zero3_gathered(group.params) if group.params else contextlib.nullcontext()
        with gathered:
            for entry in group.entries:
                yield entry.name, entry.read()


@contextlib.contextmanager
def no_zero3_init():
    """Load a plain, unpartitioned model even while a ZeRO-3 trainer is alive.

    transformers partitions every ``from_pretrained`` while a ZeRO-3 config is registered;
    models cpt loads only to evaluate (on the main process) must stay whole.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def release_deepspeed_engine(accelerator) -> None:
    """Free a finished trainer's DeepSpeed engine and ZeRO optimizer; the model stays usable.

    One cpt run trains a model per task in one process, and DeepSpeed (0.19) keeps every
    engine alive after its trainer is gone: measured +2.6 GiB a task for SmolLM2 under
    ZeRO-3 on CPU, the whole previous model and optimizer state. The references, found
    with ``gc.get_referrers`` from a dead task's optimizer:

    * the gradient hooks on the parameters (ZeRO-2 and 3), held in C++ by autograd:
      ``engine.destroy()`` removes them (called by ``accelerator.free_memory()``, which
      also drops accelerate's own references);
    * the forward hooks the engine puts on the model, which ``destroy()`` leaves: they
      would keep the engine alive as long as the model, and run its forward prologue in
      evaluation;
    * ZeRO-3's root module in ``parameter_offload.FWD_MODULE_STACK``, a process-wide list
      nothing pops it from;
    * ZeRO-3's ``functools.lru_cache`` on the class method
      ``PartitionedParameterCoordinator.__params_to_release``, keyed by the coordinator and
      its modules and never cleared. Clearing it is safe for any live engine: the values
      are recomputed on the next step.
    """
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    engine = wrapped.engine if wrapped is not None else None
    accelerator.free_memory()
    if engine is None:
        return
    for hook_name in ("module_forward_pre_hook", "module_forward_post_hook"):
        hook = getattr(engine, hook_name, None)
        if hook is not None:
            hook.remove()
            setattr(engine, hook_name, None)
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    engine_modules = {id(module) for module in engine.module.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [
        module for module in parameter_offload.FWD_MODULE_STACK if id(module) not in engine_modules
    ]
    cached = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    # DeepSpeed's nvtx decorator wraps the lru_cache without functools.wraps: look in its closure
    for candidate in (cached, *(cell.cell_contents for cell in getattr(cached, "__closure__", None) or ())):
        if callable(getattr(candidate, "cache_clear", None)):
            candidate.cache_clear()
            break


def _is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under any PEFT/DDP wrapper (for its config and save_pretrained)."""
    model = unwrap_model(model)
    return model.get_base_model() if is_peft_model(model) else model


def save_model_folder(
    model: torch.nn.Module,
    tokenizer,
    folder: str | os.PathLike,
    marker: dict | None = None,
    max_shard_size: int | str | None = None,
) -> None:
    """Write the model's full (LoRA-merged) weights as an HF safetensors folder + tokenizer.

    The weights keep the model's dtype; ``max_shard_size`` is ``save_pretrained``'s (None:
    its default). ``marker`` is written as ``cpt_state.json`` inside the folder, so a folder always says
    which step it holds; call inside :func:`cpt.io.staged_dir` for an atomic replace.
    """
    folder = Path(folder)
    if is_zero3(model):
        # Gathered module by module and written tensor by tensor into HF's shard plan by
        # the main process: no rank ever holds the whole model. Every rank must call this.
        _save_zero3_folder(model, folder, max_shard_size)
        if not _is_main_process():
            return
        write_model_files(folder, model=model, tokenizer=tokenizer, marker=marker)
    else:
        weights = ModelWeights(model)  # the model's dtype: a bf16 model's folder is bf16
        state_dict = {name: tensor.to(weights.dtype(name)).contiguous() for name, tensor in weights.items()}
        shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        plain_model(model).save_pretrained(folder, state_dict=state_dict, safe_serialization=True, **shards)
        write_model_files(folder, tokenizer=tokenizer, marker=marker)


def write_model_files(
    folder: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    config_from: str | os.PathLike | None = None,
    tokenizer=None,
    marker: dict | None = None,
) -> None:
    """The files of an HF model folder besides the weights: the one place a state folder's
    configuration, tokenizer and ``cpt_state.json`` marker are written.

    Args:
        folder: the (staging) folder, whose weights are written by the caller.
        model: write its configuration (and generation configuration) files.
        config_from: else copy ``config.json`` / ``generation_config.json`` from this HF folder.
        tokenizer: saved with ``save_pretrained`` when given.
        marker: written as ``cpt_state.json`` (which step the folder holds) when given.
    """
    folder = Path(folder)
    if model is not None:
        import copy

        hf_model = plain_model(model)
        config = copy.deepcopy(hf_model.config)
        config.dtype = hf_model.dtype  # the dtype the weights are written in, as save_pretrained records it
        config.save_pretrained(folder)
        if getattr(hf_model, "generation_config", None) is not None:
            hf_model.generation_config.save_pretrained(folder)
    elif config_from is not None:
        import shutil

        for name in ("config.json", "generation_config.json"):
            if (Path(config_from) / name).exists():
                shutil.copy2(Path(config_from) / name, folder / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if marker is not None:
        (folder / STATE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def save_pretrained_order(model: torch.nn.Module, layout: dict[str, tuple[torch.Size, torch.dtype]]) -> list[str]:
    """The order in which ``model.save_pretrained`` plans shards over tensors ``layout`` given in ``state_dict`` order.

    ``huggingface_hub``'s plan fills shards in the order it is given, and transformers 5
    hands it the tensors sorted by ``dot_natural_key`` (``layers.2`` before ``layers.10``)
    whenever the model has weight conversions to revert (``revert_weight_conversion``;
    Llama-like models do), else in ``state_dict`` order. Which one is asked of that same
    function, on meta tensors (nothing is allocated). Only the order is taken: names stay
    the model's own (a model whose conversions rename or fuse tensors on load is written
    under its loaded names, as cpt's merge writes every state).
    """
    names = list(layout)
    try:
        from transformers.core_model_loading import dot_natural_key, revert_weight_conversion
    except ImportError:  # transformers 4: save_pretrained keeps the state_dict order
        return names
    placeholders = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in layout.items()}
    try:
        reverted = revert_weight_conversion(plain_model(model), placeholders)
    except Exception:  # noqa: BLE001 - a conversion that needs values: there are conversions, so it sorts
        reverted = None
    return names if reverted is placeholders else sorted(names, key=dot_natural_key)


#: The weight files of an HF folder: ``model.safetensors``, its index, HF's shards and cpt's old ones.
_HF_WEIGHT_FILE = re.compile(r"model(-\d{5}(-of-\d{5})?)?\.safetensors(\.index\.json)?")


def _save_zero3_folder(model: torch.nn.Module, folder: Path, max_shard_size: int | str | None = None) -> None:
    """The weights of a ZeRO-3 model in ``folder``, laid out as ``save_pretrained`` lays them out.

    The shard plan is HF's (:class:`cpt.merging.batch_io.StreamingShardWriter`: file names,
    ``model.safetensors.index.json``, ``max_shard_size`` with ``save_pretrained``'s default),
    made from the full shapes before anything is gathered; each module's tensors are then
    gathered (every rank) and written at their place in their shard (main process), so no
    rank holds more than one module. Folders written before this by cpt (``model-0000i.safetensors``,
    512 MiB each, with an index) stay readable: every reader goes through the index.
    """
    from cpt.merging.batch_io import StreamingShardWriter

    writer = None
    if _is_main_process():
        # As save_pretrained: weight files of an earlier save in this folder go (a stale index
        # beside a new single model.safetensors would be read instead of it).
        for stale in Path(folder).glob("model*.safetensors*"):
            if _HF_WEIGHT_FILE.fullmatch(stale.name):
                stale.unlink()
        entries = {entry.name: entry for group in _zero3_groups(model) for entry in group.entries}
        layout = {name: (entry.shape, entry.dtype) for name, entry in entries.items()}
        writer = StreamingShardWriter(
            folder,
            {name: layout[name] for name in save_pretrained_order(model, layout)},
            max_shard_size,
            # the written model's num_parameters(), as save_pretrained records it: tied ones
            # once, LoRA factors not (they are merged into W)
            index_metadata={"total_parameters": sum(e.shape.numel() for e in entries.values() if e.is_parameter)},
        )
    for name, tensor in zero3_named_tensors(model):
        if writer is not None:
            writer.write({name: tensor})
    if writer is not None:
        writer.close()


def read_marker(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / STATE_MARKER
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------- host memory
@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on macOS and musl
    except (OSError, AttributeError):
        return None


def release_freed_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Why: after the first multi-megabyte buffer is freed, glibc raises its mmap threshold
    and serves later buffers of that size from its heap, which it keeps once they are
    freed. A streamed merge that reads a model tensor by tensor then grows by every tensor
    it ever read (measured: +1.4 GiB over one SmolLM2 step). Calling this between batches
    keeps resident memory at one batch; it costs about a millisecond a call (measured).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# ---------------------------------------------------------------------- weights on disk
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsWeights:
    """Lazy, read-only access to an HF folder's safetensors weights, one tensor at a time."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            single = self.folder / "model.safetensors"
            if not single.exists():
                raise CptError(
                    f"{self.folder}: no model.safetensors (or index) found; cpt reads and writes safetensors weights only"
                )
            with safe_open(single, framework="pt") as handle:
                self._files = {name: single for name in handle.keys()}
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def _handle(self, name: str):
        file = self._files.get(name)
        if file is None:
            raise KeyError(f"{name} not in {self.folder}")
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(file, framework="pt", device="cpu")
        return handle

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self._handle(name).get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk now (memory-mapped; nothing else is loaded)."""
        return self._handle(name).get_tensor(name)

    __getitem__ = get  # ``weights[name]``, like the dict of a live model's tensors

    def release(self) -> None:
        """Unmap the files read so far (the next read reopens them).

        Pages of a memory-mapped file count in the process's resident memory while mapped,
        so a pass over a whole model would otherwise leave every file resident; they stay
        in the OS page cache, where the next read finds them.
        """
        self._handles.clear()

    def get_rows(self, name: str, rows: slice) -> torch.Tensor:
        """Rows ``rows`` of one tensor, reading only those bytes from disk."""
        return self._handle(name).get_slice(name)[rows]


# ---------------------------------------------------------------------- folders the callbacks read
def gather_expert_folder(
    model: torch.nn.Module | None, folder: str | os.PathLike, max_shard_size: int | str | None = None
) -> Path | None:
    """Under DeepSpeed ZeRO-3, write the expert's full weights to ``folder`` and return it; else None.

    A ZeRO-3 model's parameters are partitioned across ranks, so whoever reads the expert
    E_t after training (its evaluation, the geometry callback, the integration callback)
    reads this HF folder instead of the live module. It is gathered module by module and
    written tensor by tensor by the main process (:func:`save_model_folder`): no rank ever
    holds the whole model. Its files are ``save_pretrained``'s, in shards of at most
    ``max_shard_size`` (None: ``save_pretrained``'s default); give the recipe's when the
    folder may become the state (a strategy whose state is the expert copies it). A
    collective: every rank must call it. Without ZeRO-3 (or with no model) nothing is
    written and the caller reads the live model.
    """
    if model is None or not is_zero3(model):
        return None
    save_model_folder(model, None, folder, max_shard_size=max_shard_size)
    return Path(folder)


def local_model_folder(name_or_path: str | os.PathLike, revision: str | None = None, *, field: str = "base") -> Path:
    """A local HF folder of a model's weights: ``name_or_path`` itself, or a hub id's cached snapshot.

    Only the ``*.json`` and ``*.safetensors`` files are fetched (what :class:`SafetensorsWeights`
    and a model's config need). With ``HF_HUB_OFFLINE=1`` a snapshot already in the cache is
    used; anything else that fails becomes a one-line :class:`CptError` naming ``field``.
    """
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # noqa: BLE001 - every failure means the same thing to the user
        raise CptError(
            f"{field}: {str(name_or_path)!r} is not a local folder and cannot be fetched from the Hugging Face hub "
            f"({type(exc).__name__}); pass a local HF folder, or download it first while online"
        ) from None


# ---------------------------------------------------------------------- LoRA adapter folders
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """A PEFT adapter folder (``adapter_config.json``), as ``PeftModel.save_pretrained`` writes it."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


class LoraAdapter:
    """The LoRA factors of a PEFT adapter folder, by the base tensor they update: Δ = scale·B@A.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (lazily, one factor at a
    time). ``scale`` is PEFT's: ``lora_alpha / r`` (``/ √r`` with ``use_rslora``), with
    ``alpha_pattern`` and the rank of each module's own factors (so ``rank_pattern`` is
    honoured). Adapters this cannot express as ``W + scale·B@A`` on plain weights — DoRA,
    ``fan_in_fan_out``, embedding LoRA, trained biases or ``modules_to_save`` — are refused
    with a :class:`CptError` naming the field.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        config = json.loads((self.folder / ADAPTER_CONFIG).read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise CptError(f"{self.folder}: a {config.get('peft_type')} adapter; cpt reads LoRA adapters only")
        for field, value in (("use_dora", True), ("fan_in_fan_out", True)):
            if config.get(field) == value:
                raise CptError(f"{self.folder}: {field}: true adapters are not supported; merge it with peft first")
        if config.get("modules_to_save"):
            raise CptError(
                f"{self.folder}: modules_to_save={config['modules_to_save']} is not supported; merge it with peft first"
            )
        weights = self.folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise CptError(f"{self.folder}: no {ADAPTER_WEIGHTS} (cpt reads safetensors adapters only)")
        self.config = config
        self._file = weights
        self._keys: dict[str, dict[str, str]] = {}
        with safe_open(weights, framework="pt") as handle:
            for key in handle.keys():
                match = _ADAPTER_KEY.match(key)
                if match is None:
                    raise CptError(f"{weights}: tensor {key!r} is not a LoRA factor of a linear layer; not supported")
                self._keys.setdefault(f"{match['module']}.weight", {})[match["factor"]] = key
        incomplete = [name for name, factors in self._keys.items() if len(factors) != 2]
        if incomplete:
            raise CptError(f"{weights}: {incomplete[0]} has only one of lora_A / lora_B")

    def names(self) -> list[str]:
        """The base weights this adapter updates."""
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def scale(self, name: str, rank: int) -> float:
        module = name.removesuffix(".weight")
        alpha = self.config.get("lora_alpha", 8)
        alpha_pattern = self.config.get("alpha_pattern") or {}
        for pattern, value in alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(lora_B [d_out, r], lora_A [r, d_in], scale)`` of ``name``, float32."""
        keys = self._keys[name]
        with safe_open(self._file, framework="pt") as handle:
            lora_a = handle.get_tensor(keys["A"]).to(torch.float32)
            lora_b = handle.get_tensor(keys["B"]).to(torch.float32)
        return lora_b, lora_a, self.scale(name, lora_a.shape[0])

    def factor_shapes(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        keys = self._keys[name]
        with safe_open(self._file, framework="pt") as handle:
            return (
                tuple(handle.get_slice(keys["B"]).get_shape()),
                tuple(handle.get_slice(keys["A"]).get_shape()),
            )

    def delta(self, name: str) -> torch.Tensor:
        """The dense ``scale·B@A`` of one tensor, float32 (merging only; geometry uses :meth:`factors`)."""
        lora_b, lora_a, scale = self.factors(name)
        return scale * (lora_b @ lora_a)


class AdapterExpertWeights:
    """An expert given as a LoRA adapter over a base, read like :class:`SafetensorsWeights`.

    ``expert[name]`` is ``θ0[name] + scale·B@A`` in float32 for a tensor the adapter
    updates (the dense delta of one tensor at a time, never the whole model), else θ0's
    tensor; ``dtype(name)`` is the base's, so a state written from it keeps the model's dtype.
    """

    def __init__(self, adapter: str | os.PathLike | LoraAdapter, base: SafetensorsWeights):
        self.adapter = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter(adapter)
        self.base = base
        unknown = [name for name in self.adapter.names() if name not in base]
        if unknown:
            raise CptError(
                f"{self.adapter.folder}: the adapter updates {unknown[0]!r}, which the base {base.folder} lacks; "
                "is it an adapter of this base?"
            )
        for name in self.adapter.names():
            (d_out, _), (_, d_in) = self.adapter.factor_shapes(name)
            if tuple(base.shape(name)) != (d_out, d_in):
                raise CptError(
                    f"{self.adapter.folder}: {name} is {d_out}×{d_in} in the adapter but "
                    f"{tuple(base.shape(name))} in the base {base.folder}"
                )

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> torch.Size:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.adapter:
            return self.base[name]
        return self.base[name].to(torch.float32) + self.adapter.delta(name)

    def get_rows(self, name: str, rows: slice) -> torch.Tensor:
        return self[name][rows]

    def release(self) -> None:
        self.base.release()


def save_lora_adapter(model: torch.nn.Module, folder: str | os.PathLike) -> Path | None:
    """Write a PEFT model's adapter (``adapter_config.json`` + ``adapter_model.safetensors``) to ``folder``.

    Returns the folder on the main process, None elsewhere or when ``model`` is not a PEFT
    model. Under ZeRO-3 the adapter's parameters are gathered first (a collective: every
    rank must call this). Written into a staging folder and renamed, so the folder is whole.
    """
    from cpt.io import staged_dir

    model = unwrap_model(model)
    if not is_peft_model(model):
        return None
    main = _is_main_process()
    params = [param for name, param in model.named_parameters() if "lora_" in name]
    gathered = zero3_gathered(params) if is_zero3(model) else contextlib.nullcontext()
    with gathered:
        if not main:
            return None
        with staged_dir(Path(folder)) as staged:
            model.save_pretrained(staged, safe_serialization=True)
    return Path(folder)


def expert_weights(folder: str | os.PathLike, base: SafetensorsWeights) -> SafetensorsWeights | AdapterExpertWeights:
    """An expert folder's full weights: an HF model folder, or a LoRA adapter folder over ``base``."""
    return AdapterExpertWeights(folder, base) if is_adapter_folder(folder) else SafetensorsWeights(folder)
