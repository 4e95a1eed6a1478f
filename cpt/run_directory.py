"""``runs/<name>/``: the paths of a run directory and its atomic records (DESIGN: the run directory).

The run directory is a run's only state. ``manifest.json`` holds the per-task status,
timings and library versions; :class:`RunDirectory` reads and writes it atomically.
"""

from __future__ import annotations

import importlib.metadata
import sys
from datetime import datetime, timezone
from pathlib import Path

from cpt.io import atomic_write_json, read_json

MANIFEST_FORMAT = 1
VERSIONED_PACKAGES = ("cpt", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "evaluate", "deepspeed")


def library_versions() -> dict[str, str]:
    """The Python version and the versions of the packages a run's results depend on."""
    versions = {"python": sys.version.split()[0]}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (manifest timestamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunDirectory:
    """Paths and atomic records of ``runs/<name>/``."""

    def __init__(self, root: Path):
        self.root = root
        self.state = root / "state"
        self.manifest_path = root / "manifest.json"
        self.matrix_path = root / "eval" / "matrix.json"
        self.geometry = root / "geometry"
        self.history = root / "history"
        self.integration = root / "integration"
        self.strategy = root / "strategy"

    def work(self, task: str) -> Path:
        """The trainer's output folder of one task (checkpoints; removed once the task is integrated)."""
        return self.root / "work" / task

    def integration_stats(self, step: int, task: str) -> Path:
        return self.integration / f"{step}_{task}.json"

    def read_manifest(self) -> dict | None:
        return read_json(self.manifest_path)

    def write_manifest(self, manifest: dict) -> None:
        manifest["updated"] = utc_now()
        atomic_write_json(self.manifest_path, manifest)
