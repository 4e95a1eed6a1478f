"""A content-addressed cache of experts trained from θ0 (METHOD §6, "shared experts").

An expert trained from the base model is a function of exactly these inputs, which form
its **key** (the sha256 of their canonical JSON, :func:`expert_key`):

``base``
    the base model's content: every weight, config and tokenizer file of the resolved
    model folder, each identified by its sha256 (for a Hugging Face cache snapshot the blob
    name, which *is* the file's sha256 for LFS files and its git blob hash otherwise — free;
    for other folders the sha256 is computed once and remembered by (path, size, mtime)),
    plus the load settings that change the weights (``dtype``, ``attn_implementation``).
``train_data``
    the sha256 and count of the training examples exactly as the trainer receives them
    (after loading, field mapping, templates, held-out split, ``max_examples`` and the
    data shuffle): whatever changes them changes the key, and nothing else about the data
    file (e.g. the eval split, its size) does.
``training_args``
    the resolved ``SFTConfig`` (``args.to_dict()``, which includes the training seed)
    minus the fields listed in :data:`NON_TRAINING_FIELDS` (where output and logs go,
    how often to log or save, evaluation settings), which cannot change the weights.
``lora``
    the LoRA settings (``None`` for full fine-tuning).
``platform``
    the device type and the versions of torch, transformers, trl and peft: the same
    inputs on another device or library version give numerically different weights.

The strategy, the run name, ``output_dir``, evaluation and geometry settings are not part
of the key, so every θ0-based strategy of a study (and any later run) shares the expert.

**Layout.** ``$CPT_CACHE_DIR/experts`` (else ``$CPT_CACHE/experts``, the asset cache's root; default
``~/.cache/cpt/experts``), one folder
per key: LoRA experts as the adapter (``adapter_model.safetensors`` +
``adapter_config.json``: a few MB), full experts as ``model.safetensors`` + ``config.json``
(the model's size, e.g. 0.5 GB for SmolLM2-135M in float32), and ``manifest.json`` (the key
inputs, each file's size and sha256, the training log) written last. ``cpt cache info``
lists the entries and their size; ``cpt cache clear`` removes them.

**Safety.** A writer holds an exclusive ``fcntl.flock`` on ``<key>.lock`` while it trains
and stores, so a second run needing the same expert waits and then reuses it; it stages the
entry in a temporary folder and renames it into place. A reader verifies every file's size
and sha256 against the manifest before use; an entry that fails (truncated, corrupted,
manifest missing) is removed under the lock and the expert is trained again — never used.

Not cached (trained as usual): experts of strategies that train from the state, strategies
that change the training data or add training callbacks, DeepSpeed ZeRO-3 and multi-process
runs (every rank would have to agree on hit or miss).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cpt.errors import CptError
from cpt.io import atomic_write_json, read_json

CACHE_FORMAT = 1

#: SFTConfig fields that cannot change the trained weights (paths, logging, saving,
#: evaluation, hub upload): left out of the key. Everything else is in it.
NON_TRAINING_FIELDS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "logging_dir",
        "run_name",
        "project",
        "trackio_space_id",
        "report_to",
        "logging_strategy",
        "logging_steps",
        "logging_first_step",
        "logging_nan_inf_filter",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "disable_tqdm",
        "skip_memory_metrics",
        "include_num_input_tokens_seen",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_safetensors",
        "save_on_each_node",
        "save_only_model",
        "restore_callback_states_from_checkpoint",
        "resume_from_checkpoint",
        "eval_strategy",
        "eval_steps",
        "eval_delay",
        "eval_on_start",
        "eval_do_concat_batches",
        "eval_accumulation_steps",
        "eval_use_gather_object",
        "per_device_eval_batch_size",
        "prediction_loss_only",
        "include_for_metrics",
        "batch_eval_metrics",
        "do_eval",
        "do_predict",
        "eval_packing",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "hub_private_repo",
        "hub_always_push",
        "hub_revision",
        "dataloader_num_workers",
        "dataloader_prefetch_factor",
        "dataloader_persistent_workers",
    }
)

#: Files of a model folder that define the model (weights, config, tokenizer, remote code).
MODEL_FILE = re.compile(r"\.(safetensors|bin|json|model|txt|py|tiktoken|jinja)$")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX40 = re.compile(r"[0-9a-f]{40}")


def cache_root() -> Path:
    """``$CPT_CACHE_DIR``, else ``$CPT_CACHE`` (the asset cache root, :mod:`cpt.assets`), else ``~/.cache/cpt``."""
    root = os.environ.get("CPT_CACHE_DIR") or os.environ.get("CPT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "cpt"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


# ---------------------------------------------------------------------- key inputs
def model_folder_identity(folder: str | os.PathLike, memo_path: Path | None = None) -> dict[str, str]:
    """``{relative file name: content id}`` of the files that define a model folder.

    A symlink into a Hugging Face cache ``blobs/`` folder is identified by its blob name
    (sha256 for LFS files, git blob sha1 otherwise) without reading it; other files by their
    sha256, remembered in ``memo_path`` by (absolute path, size, mtime) so that a large base
    model is read once, not once per run.
    """
    folder = Path(folder)
    memo = read_json(memo_path, {}) if memo_path else {}
    changed = False
    identity: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and MODEL_FILE.search(p.name)):
        relative = path.relative_to(folder).as_posix()
        if relative.startswith(".") or "/." in relative:
            continue
        if path.is_symlink() and path.resolve().parent.name == "blobs":
            blob = path.resolve().name
            if _HEX64.fullmatch(blob):
                identity[relative] = f"sha256:{blob}"
                continue
            if _HEX40.fullmatch(blob):
                identity[relative] = f"git-sha1:{blob}"
                continue
        stat = path.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        absolute = str(path.resolve())
        if memo.get(absolute, {}).get("stamp") != stamp:
            memo[absolute] = {"stamp": stamp, "sha256": sha256_file(path)}
            changed = True
        identity[relative] = f"sha256:{memo[absolute]['sha256']}"
    if not identity:
        raise CptError(
            f"expert cache: {folder} holds no model files (*.safetensors, config.json); cannot identify the base model"
        )
    if changed and memo_path:
        atomic_write_json(memo_path, memo)
    return identity


def dataset_identity(rows) -> dict[str, Any]:
    """sha256 and count of training examples (an iterable of dicts, e.g. a ``datasets.Dataset``)."""
    digest = hashlib.sha256()
    count = 0
    for row in rows:
        digest.update(canonical_json(row).encode())
        digest.update(b"\n")
        count += 1
    return {"sha256": digest.hexdigest(), "examples": count}


def training_args_identity(args) -> dict[str, Any]:
    """The resolved training arguments that can change the weights (see :data:`NON_TRAINING_FIELDS`)."""
    values = args.to_dict() if hasattr(args, "to_dict") else dict(args)
    return {key: value for key, value in sorted(values.items()) if key not in NON_TRAINING_FIELDS}


def platform_identity(device: str) -> dict[str, str]:
    import importlib.metadata

    versions = {}
    for package in ("torch", "transformers", "trl", "peft"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"device": device, **versions}


def expert_key_inputs(
    *,
    base_folder: str | os.PathLike,
    model_settings: dict[str, Any],
    train_dataset,
    args,
    lora: dict[str, Any] | None,
    device: str,
    memo_path: Path | None = None,
) -> dict[str, Any]:
    """Everything an expert trained from θ0 depends on (module docstring), as plain JSON."""
    return {
        "format": CACHE_FORMAT,
        "base": {"files": model_folder_identity(base_folder, memo_path), **model_settings},
        "train_data": dataset_identity(train_dataset),
        "training_args": json.loads(canonical_json(training_args_identity(args))),
        "lora": json.loads(canonical_json(lora)) if lora is not None else None,
        "platform": platform_identity(device),
    }


def expert_key(inputs: dict[str, Any]) -> str:
    """The cache key: sha256 of the canonical JSON of :func:`expert_key_inputs`."""
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


# ---------------------------------------------------------------------- the store
@dataclass
class CachedExpert:
    """A verified cache entry."""

    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]


class ExpertCache:
    """The expert store at ``root`` (``cache_root()/experts`` by default); see the module docstring."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else cache_root() / "experts"

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive lock on one key (blocks until another process holding it is done)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def verify(self, key: str) -> CachedExpert | None:
        """The entry if every file matches its manifest (size and sha256); otherwise ``None``."""
        entry = self.entry_dir(key)
        try:
            manifest = read_json(entry / "manifest.json")
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT or manifest.get("key") != key:
            return None
        for name, expected in manifest.get("files", {}).items():
            path = entry / name
            try:
                if path.stat().st_size != expected["size"] or sha256_file(path) != expected["sha256"]:
                    return None
            except OSError:
                return None
        return CachedExpert(key, entry, manifest)

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[CachedExpert | None]:
        """Yields the verified entry of ``key``, or ``None`` while holding the key's lock.

        On ``None`` the caller produces the expert and calls :meth:`store` inside the
        ``with`` block; a concurrent caller waits for the lock and then finds the entry. An
        entry that fails verification is removed (under the lock) and ``None`` is yielded.
        """
        entry = self.verify(key) if self.entry_dir(key).exists() else None
        if entry is not None:
            yield entry
            return
        with self.lock(key):
            entry = self.verify(key)  # another process may have stored it while this one waited
            if entry is None:
                self._remove(key)  # a truncated or corrupted entry is never used
            yield entry

    def _remove(self, key: str) -> None:
        if self.entry_dir(key).exists():
            shutil.rmtree(self.entry_dir(key), ignore_errors=True)

    def store(
        self, key: str, write_files, *, kind: str, inputs: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> CachedExpert:
        """Stage an entry (``write_files(folder)`` writes the expert), add its manifest last, rename it into place.

        Call while holding :meth:`lock` for ``key``.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(self.root / f".{key}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        staging.mkdir()
        try:
            write_files(staging)
            files = {
                path.relative_to(staging).as_posix(): {"size": path.stat().st_size, "sha256": sha256_file(path)}
                for path in sorted(staging.rglob("*"))
                if path.is_file()
            }
            manifest = {
                "format": CACHE_FORMAT,
                "key": key,
                "kind": kind,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "files": files,
                "inputs": inputs,
                **(extra or {}),
            }
            atomic_write_json(staging / "manifest.json", manifest)
            self._remove(key)
            os.replace(staging, self.entry_dir(key))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return CachedExpert(key, self.entry_dir(key), manifest)

    # ------------------------------------------------------------------ `cpt cache`
    def entries(self) -> list[dict[str, Any]]:
        """One summary per entry folder (not verified: ``cpt cache info`` stays fast)."""
        out = []
        if not self.root.exists():
            return out
        for entry in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            manifest = read_json(entry / "manifest.json", {}) if (entry / "manifest.json").exists() else {}
            size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
            out.append(
                {
                    "key": entry.name,
                    "kind": manifest.get("kind", "incomplete"),
                    "label": manifest.get("label", ""),
                    "created": manifest.get("created", ""),
                    "bytes": size,
                }
            )
        return out

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) if self.root.exists() else 0

    def clear(self) -> int:
        """Remove every entry (and stale staging folders and locks); returns the number of entries removed.

        Run it when no run is using the cache: a run that holds a key's lock keeps training, but
        a run started afterwards would no longer wait for it.
        """
        if not self.root.exists():
            return 0
        removed = 0
        for path in list(self.root.iterdir()):
            if path.is_dir():
                removed += not path.name.startswith(".")
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return removed


# ---------------------------------------------------------------------- the runner's hook
def cache_enabled_by_env() -> bool:
    """``CPT_EXPERT_CACHE=1`` turns the cache on for ``cpt run``; ``cpt study`` always uses it."""
    return os.environ.get("CPT_EXPERT_CACHE", "").strip().lower() in ("1", "true", "yes", "on")


def _is_library_callback(callback) -> bool:
    return type(callback).__module__.startswith("transformers.")


def fire_train_end(trainer) -> None:
    """Run the user/cpt callbacks' ``on_train_end`` as ``trainer.train()`` would at its end.

    The library's own callbacks (progress bars, printers, flow control) are skipped: no
    training loop ran, so they have nothing to close.
    """
    handler = trainer.callback_handler
    for callback in handler.callbacks:
        if _is_library_callback(callback):
            continue
        callback.on_train_end(
            trainer.args,
            trainer.state,
            trainer.control,
            model=trainer.model,
            processing_class=handler.processing_class,
            optimizer=handler.optimizer,
            lr_scheduler=handler.lr_scheduler,
            train_dataloader=handler.train_dataloader,
            eval_dataloader=handler.eval_dataloader,
        )


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def write_expert(model, folder: Path) -> str:
    """Write a trained expert: the adapter of a PEFT model, else the full weights + config. Returns the kind."""
    if _is_peft(model):
        model.save_pretrained(folder, safe_serialization=True)
        (folder / "README.md").unlink(missing_ok=True)  # PEFT's model card: not part of the expert
        return "lora"
    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"))
    model.config.to_json_file(folder / "config.json")
    return "full"


def load_expert(model, entry: CachedExpert) -> None:
    """Put a cached expert's weights into ``model`` (built the way the trainer built it)."""
    if entry.kind == "lora":
        if not _is_peft(model):
            raise CptError(
                f"expert cache entry {entry.key} is a LoRA adapter but the model has none; run `cpt cache clear`"
            )
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(model, load_file(entry.path / "adapter_model.safetensors"))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise CptError(
                f"expert cache entry {entry.key}: adapter tensors {unexpected[:3]} do not fit the model; "
                "run `cpt cache clear`"
            )
        return
    from safetensors.torch import load_model

    load_model(model, str(entry.path / "model.safetensors"), strict=True)


def _store_callback(cache: ExpertCache, key: str, inputs: dict[str, Any], label: str):
    from transformers import TrainerCallback

    class StoreExpert(TrainerCallback):
        """Stores the trained expert at ``on_train_end``, before any integration callback changes it."""

        def __init__(self):
            self.started = time.perf_counter()
            self.stored: CachedExpert | None = None

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero or model is None:
                return
            kind = "lora" if _is_peft(model) else "full"
            extra = {
                "label": label,
                "log_history": state.log_history,
                "global_step": state.global_step,
                "train_seconds": round(time.perf_counter() - self.started, 3),
            }
            self.stored = cache.store(
                key, lambda folder: write_expert(model, folder), kind=kind, inputs=inputs, extra=extra
            )

    return StoreExpert()


def train_or_reuse_expert(
    trainer,
    *,
    recipe,
    train_dataset,
    base_folder: str | os.PathLike | Callable[[], str | os.PathLike],
    train_from: str,
    cacheable: bool,
    record: dict,
    label: str,
    resume_from_checkpoint: str | None = None,
    cache: ExpertCache | None = None,
) -> None:
    """``trainer.train()``, or — for an expert trained from θ0 that the cache holds — its cached weights.

    On a hit the cached expert is loaded into ``trainer.model`` and the callbacks'
    ``on_train_end`` (expert evaluation, geometry, integration) run on it as after training;
    the trainer's log history is restored from the entry. On a miss the trainer trains and the
    expert is stored before the other ``on_train_end`` callbacks run. ``record`` (the task's
    manifest record) gets ``expert_cache: {"key", "hit"}``.

    Args:
        trainer: the task's trainer, built with all its callbacks, not yet trained.
        train_dataset: the training examples as cpt handed them to the trainer (hashed into the key).
        recipe: the run's :class:`~cpt.recipe.Recipe` (model load settings and LoRA settings).
        base_folder: the local folder of θ0, or a function returning it (called only when the cache is used).
        train_from: ``"base"`` or ``"state"`` (only ``"base"`` experts are cached).
        cacheable: ``False`` when the strategy changes training (own data or callbacks).
        record: the task's manifest record.
        label: a readable name for ``cpt cache info`` (e.g. the task name); not in the key.
        resume_from_checkpoint: passed to ``trainer.train`` on a miss.
        cache: the store; default: ``ExpertCache()`` when ``CPT_EXPERT_CACHE`` is on, else none.
    """
    from cpt.tensors import is_zero3

    if cache is None and cache_enabled_by_env():
        cache = ExpertCache()
    usable = (
        cache is not None
        and cacheable
        and train_from == "base"
        and resume_from_checkpoint is None
        and trainer.accelerator.num_processes == 1
        and not is_zero3(trainer.model)
    )
    if not usable:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        return
    if callable(base_folder):
        base_folder = base_folder()
    model_settings = {"dtype": recipe.model.dtype, "attn_implementation": recipe.model.attn_implementation}
    inputs = expert_key_inputs(
        base_folder=base_folder,
        model_settings=model_settings,
        train_dataset=train_dataset,
        args=trainer.args,
        lora=recipe.peft.model_dump(mode="json") if recipe.peft is not None else None,
        device=trainer.args.device.type,
        memo_path=cache.root.parent / "file_hashes.json",
    )
    key = expert_key(inputs)
    with cache.claim(key) as entry:
        if entry is None:  # a miss: train while holding the key's lock, store before integration runs
            trainer.callback_handler.callbacks.insert(0, _store_callback(cache, key, inputs, label))
            trainer.train()
            record["expert_cache"] = {"key": key, "hit": False}
            return
    load_expert(trainer.model, entry)
    trainer.state.log_history = list(entry.manifest.get("log_history", []))
    trainer.state.global_step = int(entry.manifest.get("global_step", 0))
    record["expert_cache"] = {"key": key, "hit": True}
    fire_train_end(trainer)
