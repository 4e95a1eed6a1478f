"""Asset name → cached folder: :func:`resolve_model`, :func:`resolve_dataset`, :func:`fetch` (``cpt assets fetch``).

Each builds what is missing on first use (download, conversion) under a per-asset lock, and
returns the cached folder at once afterwards. Hub ids and local paths pass through
:func:`resolve_model` unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path

from cpt.assets.bigbench import read_bigbench
from cpt.assets.cache import cache_lock, log
from cpt.assets.dataset_files import dataset_dir, dataset_ready, parse_dataset_name, write_dataset
from cpt.assets.gguf import prepare_model
from cpt.assets.openai_evals import read_openai_evals
from cpt.assets.registry import DATASET_SOURCES, MODEL_ASSETS, is_dataset_asset, is_model_asset, list_assets
from cpt.errors import CptError
from cpt.io import recover_dir


def resolve_model(name_or_path: str) -> str:
    """An asset name → its cached HF folder (built on first use); anything else unchanged."""
    if not is_model_asset(name_or_path):
        return name_or_path
    return str(prepare_model(MODEL_ASSETS[name_or_path.strip().lower()]))


def resolve_dataset(name: str) -> Path:
    """A dataset asset name → its cached folder with train.jsonl, test.jsonl, meta.json."""
    if not is_dataset_asset(name):
        raise CptError(
            f"'{name}' is not a dataset asset; dataset assets start with "
            + " or ".join(f"'{prefix}:'" for prefix in DATASET_SOURCES)
        )
    source, path = parse_dataset_name(name)
    final = dataset_dir(source, path)
    if dataset_ready(final):
        return final
    canonical = f"{source}:{path}"
    with cache_lock(f"dataset-{canonical}"):
        recover_dir(final)
        if dataset_ready(final):
            return final
        start = time.monotonic()
        if source == "bigbench":
            examples, meta = read_bigbench(path)
        else:
            examples, meta = read_openai_evals(path)
        log(f"converting {canonical}: {len(examples)} examples…")
        write_dataset(final, canonical, examples, meta)
        log(f"{canonical} ready in {time.monotonic() - start:.1f}s: {final}")
    return final


def fetch(name: str) -> Path:
    """Make sure asset ``name`` (model or dataset) is in the cache; return its folder.

    Progress goes to stderr.
    """
    if is_model_asset(name):
        path = Path(resolve_model(name))
    elif is_dataset_asset(name):
        path = resolve_dataset(name)
    else:
        raise CptError(f"unknown asset '{name}'; known assets: " + "; ".join(list_assets()))
    log(f"{name}: {path}")
    return path
