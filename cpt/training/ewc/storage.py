"""EWC's F and θ* on disk: ``<folder>/step_<t>/{fisher,anchors}.safetensors``, written atomically.

Each finished task t writes one step folder through a staging folder + :func:`cpt.io.staged_dir`
(a kill leaves the previous state or the complete folder; :func:`stored_steps` recovers a
folder left mid-commit). Steps older than t − 1 are removed. Under ZeRO-3 every rank
writes its own shard in its own folder (chosen by :class:`callbacks.EWCCallback`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from cpt.errors import CptError
from cpt.io import recover_dir, staged_dir

FISHER_FILE = "fisher.safetensors"
ANCHORS_FILE = "anchors.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)(\.old)?$")


def step_dir(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step_{step}"


def stored_steps(folder: str | Path) -> list[int]:
    """Steps with a complete Fisher/anchors folder (recovering folders left by a kill mid-commit)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    for path in list(folder.iterdir()):
        match = _STEP_DIR.match(path.name)
        if match:
            recover_dir(step_dir(folder, int(match.group(1))))
    return sorted(
        int(match.group(1))
        for path in folder.iterdir()
        if (match := _STEP_DIR.match(path.name))
        and not match.group(2)
        and (path / FISHER_FILE).is_file()
        and (path / ANCHORS_FILE).is_file()
    )


def save_ewc_state(
    folder: str | Path,
    step: int,
    fisher: dict[str, torch.Tensor],
    anchors: dict[str, torch.Tensor],
    metadata: dict[str, Any],
) -> Path:
    """Write ``<folder>/step_<step>/{fisher,anchors}.safetensors`` atomically; keep steps ≥ step − 1.

    The previous step is kept so that a task retrained after a kill (between this write and
    the end of its integration) still finds the Fisher and anchors it started from.
    """
    from safetensors.torch import save_file

    final = step_dir(folder, step)
    file_metadata = {key: str(value) for key, value in {**metadata, "step": step}.items()}
    with staged_dir(final) as staged:
        for file, tensors in ((FISHER_FILE, fisher), (ANCHORS_FILE, anchors)):
            cpu_tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
            save_file(cpu_tensors, str(staged / file), metadata=file_metadata)
    for old in stored_steps(folder):
        if old < step - 1:
            shutil.rmtree(step_dir(folder, old), ignore_errors=True)
    return final


def load_ewc_state(folder: str | Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fisher, anchors) stored for ``step`` (on CPU)."""
    from safetensors.torch import load_file

    path = step_dir(folder, step)
    if step not in stored_steps(folder):
        raise CptError(
            f"ewc: no Fisher/anchors of task {step} in {Path(folder)}; the run directory is incomplete: rerun with --overwrite"
        )
    return load_file(str(path / FISHER_FILE)), load_file(str(path / ANCHORS_FILE))
