"""Keeping a run directory whole: ``--overwrite`` that cannot lose a run, and cleanup on resume.

**Overwrite.** ``cpt run --overwrite`` never deletes the run it replaces before the new run
exists. The old directory is renamed (one atomic ``os.replace``) to ``<name>.previous`` next
to it, the new run directory is created, and only once the new run's first manifest is
written is ``<name>.previous`` deleted (:func:`drop_previous`). If the process dies in
between, the next start finds ``<name>.previous`` and a ``<name>`` without a manifest — the
new run never started — and moves the old run back (:func:`recover_interrupted_overwrite`);
a ``<name>`` *with* a manifest means the new run had started and ``<name>.previous`` is
deleted. With the preflight (``cpt/preflight.py``) run first, a broken recipe fails before
anything is moved at all.

**Cleanup on resume.** A run killed at any moment can leave staging folders and files
behind: every atomic write in cpt builds its result under a hidden ``.<final>.<random>.tmp``
sibling (``cpt.io.staging_dir``, ``atomic_write_text``, ``atomic_save_safetensors``, the
report's plots) and replaces a folder through ``<final>.old`` (``cpt.io.commit_dir``); the
trainer's output lives in ``work/<task>``. :func:`clean_staging` removes all of them from a
run directory — staging entries anywhere (``history/.step-<t>.*.tmp``, ``strategy/ewc/.step_<t>.*.tmp``,
``.manifest.json.*.tmp``, ...), ``.old`` folders (restored when their final folder is
missing, as :func:`cpt.io.recover_dir` does), and the ``work/<task>`` folders of tasks that are
already integrated (their trainer checkpoints are no longer needed) or a half-gathered
``work/<task>/expert`` (ZeRO-3; rebuilt when the task trains again). Trainer checkpoints of
the task to be resumed are kept.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cpt.io import recover_dir

PREVIOUS_SUFFIX = ".previous"

#: Task statuses after which the task's ``work/<task>`` folder is no longer needed.
INTEGRATED_STATUSES = ("integrated", "done")


def previous_path(root: str | os.PathLike) -> Path:
    root = Path(root)
    return root.with_name(root.name + PREVIOUS_SUFFIX)


# ---------------------------------------------------------------------- overwrite
def move_aside(root: str | os.PathLike) -> Path:
    """Rename run directory ``root`` to ``<root>.previous`` (atomic); return the new path.

    A ``<root>.previous`` already there is a run replaced earlier whose replacement has
    started (else :func:`recover_interrupted_overwrite` would have restored it): it is deleted.
    """
    root, previous = Path(root), previous_path(root)
    if previous.exists():
        shutil.rmtree(previous)
    os.replace(root, previous)
    return previous


def drop_previous(root: str | os.PathLike) -> None:
    """Delete ``<root>.previous`` once the new run in ``root`` has started (its manifest exists)."""
    root = Path(root)
    if (root / "manifest.json").is_file():
        shutil.rmtree(previous_path(root), ignore_errors=True)


def recover_interrupted_overwrite(root: str | os.PathLike) -> str | None:
    """Undo or finish an ``--overwrite`` interrupted between moving the old run aside and starting the new one.

    Returns ``"restored"`` (the old run is back in ``root``), ``"dropped"`` (the new run had
    started; the old one is deleted) or None (nothing to do).
    """
    root, previous = Path(root), previous_path(root)
    if not previous.is_dir():
        return None
    if (root / "manifest.json").is_file():
        shutil.rmtree(previous, ignore_errors=True)
        return "dropped"
    if root.exists():
        shutil.rmtree(root)  # created by the replacement, which never wrote its manifest
    os.replace(previous, root)
    return "restored"


def manifest_owner(root: str | os.PathLike) -> Path:
    """The folder whose ``manifest.json`` decides what a run in ``root`` does next.

    Normally ``root``; ``<root>.previous`` when an interrupted ``--overwrite`` left the old run
    there (it will be moved back first).
    """
    root, previous = Path(root), previous_path(root)
    if previous.is_dir() and not (root / "manifest.json").is_file():
        return previous
    return root


# ---------------------------------------------------------------------- cleanup on resume
def _is_staging_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def clean_staging(root: str | os.PathLike, manifest: dict | None = None) -> list[Path]:
    """Remove what a killed run left half-done in run directory ``root`` (module docstring).

    Call on the main process only, while holding the run lock, before the run continues.

    Args:
        root: the run directory.
        manifest: its manifest; the ``work/<task>`` folders of tasks whose status is
            ``integrated`` or ``done`` are removed (no manifest: work folders are kept).

    Returns:
        The paths removed or restored, for the log.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    cleaned: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, topdown=True):
        folder = Path(dirpath)
        for name in [*dirnames, *filenames]:
            path = folder / name
            if _is_staging_name(name):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                cleaned.append(path)
            elif name.endswith(".old") and name in dirnames and folder != root / "work":
                recover_dir(folder / name[: -len(".old")])  # restores or drops it, as after commit_dir
                cleaned.append(path)
        dirnames[:] = [name for name in dirnames if (folder / name).is_dir() and not _is_staging_name(name)]
    work = root / "work"
    if manifest is not None and work.is_dir():
        statuses = {task.get("name"): task.get("status") for task in manifest.get("tasks", [])}
        for task_dir in work.iterdir():
            if statuses.get(task_dir.name) in INTEGRATED_STATUSES:
                shutil.rmtree(task_dir, ignore_errors=True)
                cleaned.append(task_dir)
            elif (task_dir / "expert").is_dir():
                shutil.rmtree(task_dir / "expert", ignore_errors=True)
                cleaned.append(task_dir / "expert")
    return cleaned
