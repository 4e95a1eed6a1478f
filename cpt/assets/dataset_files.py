"""Dataset asset folders: name → cache folder, the deterministic train/test split, the write of the folder.

A dataset asset ``<source>:<path>`` lives in ``<cache>/datasets/<source>/<path>/`` (for
OpenAI evals without the ``.jsonl`` suffix) and holds ``train.jsonl``, ``test.jsonl`` and
``meta.json``; the columns are described in the :mod:`cpt.assets` docstring. The readers
(:mod:`cpt.assets.bigbench`, :mod:`cpt.assets.openai_evals`) produce the rows;
:func:`write_dataset` splits them and writes the folder through a staging folder, committed
atomically.

Train/test split: deterministic and the same on every machine and call: the examples, in
file order, are shuffled with ``random.Random(0).shuffle``; the first
``max(1, round(n * 0.2))`` of the shuffled list (never all of them) form ``test.jsonl``, the
rest ``train.jsonl``, both in shuffled order. ``meta.json`` records the seed, the fraction
and the counts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from cpt.assets.cache import ASSET_FORMAT, asset_complete, cache_dir
from cpt.assets.registry import DATASET_SOURCES
from cpt.errors import CptError
from cpt.io import atomic_write_json, staged_dir

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def parse_dataset_name(name: str) -> tuple[str, str]:
    """``<source>:<path>`` → (source, path), the path checked and, for OpenAI evals, ending in ``.jsonl``."""
    source, _, path = name.partition(":")
    source = source.strip().lower()
    path = path.strip().strip("/")
    parts = path.split("/") if path else []
    if not parts or any(part in ("", ".", "..") for part in parts) or "\\" in path:
        _, example, _ = DATASET_SOURCES[source]
        raise CptError(f"bad dataset asset name '{name}': give a task path after '{source}:', e.g. {example}")
    if source == "openai-evals" and not path.endswith(".jsonl"):
        path += "/samples.jsonl"
    return source, path


def dataset_dir(source: str, path: str) -> Path:
    """The cache folder of the dataset asset ``<source>:<path>``."""
    if source == "openai-evals":
        path = path[: -len(".jsonl")]
    return cache_dir() / "datasets" / source / path


def dataset_ready(folder: Path) -> bool:
    """Whether ``folder`` holds a complete dataset of the current :data:`~cpt.assets.cache.ASSET_FORMAT`."""
    return asset_complete(folder, "meta.json", ("train.jsonl", "test.jsonl"))


def split_examples(examples: list, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> tuple[list, list]:
    """The deterministic train/test split described in the module docstring."""
    num_examples = len(examples)
    if num_examples < 2:
        raise CptError(f"cannot split {num_examples} example(s) into train and test: need at least 2")
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)
    num_test = min(num_examples - 1, max(1, round(num_examples * test_fraction)))
    test = [examples[i] for i in order[:num_test]]
    train = [examples[i] for i in order[num_test:]]
    return train, test


def scalar_extras(example: dict, skip: set[str]) -> dict:
    """The example's other scalar fields (e.g. BIG-bench ``comment``), kept as they are in each row."""
    return {
        key: value
        for key, value in example.items()
        if key not in skip and (value is None or isinstance(value, (str, int, float, bool)))
    }


def write_dataset(final: Path, name: str, examples: list[dict], meta: dict) -> None:
    """Split ``examples`` and write ``final``/{train,test}.jsonl + meta.json (staged, committed atomically)."""
    train, test = split_examples(examples)
    meta = {
        "asset": name,
        "format": ASSET_FORMAT,
        **meta,
        "counts": {"total": len(examples), "train": len(train), "test": len(test)},
        "split": {
            "seed": SPLIT_SEED,
            "test_fraction": TEST_FRACTION,
            "method": "random.Random(seed).shuffle of the file order; the first "
            "max(1, round(n * test_fraction)) go to test",
        },
    }
    with staged_dir(final) as staged:
        for split, rows in (("train", train), ("test", test)):
            with open(staged / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        atomic_write_json(staged / "meta.json", meta)
