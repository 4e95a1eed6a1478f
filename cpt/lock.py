"""The run lock: one ``cpt run`` per run directory at a time.

The lock is a small JSON file next to the run directory, ``<output_dir>/.<name>.lock``
(beside it rather than inside, so that it exists before the directory does and survives
``--overwrite`` moving the old directory aside). It is created with ``O_CREAT | O_EXCL``,
which is atomic on local file systems and NFSv3+, and records its holder::

    {"pid": 4242, "host": "node-1", "started": "2026-01-01T10:00:00+00:00",
     "process_start": 123456, "command": "cpt run recipes/quickstart.yaml"}

A second process finds the file and stops with one line naming the holder. A lock left by a
process that no longer runs (``kill -9``, a crashed node rebooted) is *stale*: when the
holder's host is this host and its pid is not alive — or is alive but started at another
time (``process_start``, from ``/proc/<pid>/stat``: the pid was reused) — the lock is taken
over. A lock held on another host cannot be checked from here; the message says which file
to delete once that process is known to be gone.

Under ``accelerate launch`` (several processes per run) only the main process takes the
lock; :func:`run_lock` shares its outcome with the other ranks, so every rank stops with the
same line when the run directory is in use.

Usage::

    with run_lock(recipe.run_dir):
        TaskSequenceRunner(recipe).run()
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from cpt.errors import CptError


class RunLockedError(CptError):
    """The run directory is used by another live process."""


def lock_path(run_dir: str | os.PathLike) -> Path:
    """``<output_dir>/.<name>.lock`` for run directory ``<output_dir>/<name>``."""
    run_dir = Path(run_dir)
    return run_dir.with_name(f".{run_dir.name}.lock")


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def holder_is_stale(holder: dict) -> bool:
    """Whether a lock's holder is certainly gone (same host, and its pid dead or reused)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return True
    recorded, current = holder.get("process_start"), _process_start(pid)
    return recorded is not None and current is not None and recorded != current


def describe_holder(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


class RunLock:
    """The lock file of one run directory (module docstring).

    Args:
        run_dir: the run directory (``recipe.run_dir``); it need not exist.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = lock_path(self.run_dir)
        self.token = uuid.uuid4().hex
        self.held = False

    def read_holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a process killed while creating it: unknown holder

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise :class:`RunLockedError` when it is held."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CptError(
                f"output_dir: cannot create {str(self.path.parent)!r} ({exc.strerror or type(exc).__name__})"
            ) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "process_start": _process_start(os.getpid()),
            "command": " ".join(["cpt", *sys.argv[1:]]) if sys.argv else "cpt",
            "token": self.token,
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except PermissionError:
                raise CptError(f"output_dir: cannot write the run lock {self.path} (permission denied)") from None
            except FileExistsError:
                holder = self.read_holder()
                if holder is None:
                    continue  # released in between: try again
                if holder == {} and not self._older_than(60):
                    raise RunLockedError(
                        f"{self.run_dir} is being locked by another process right now ({self.path}); try again"
                    ) from None
                if holder and not holder_is_stale(holder):
                    raise RunLockedError(
                        f"{self.run_dir} is in use by another cpt run ({describe_holder(holder)}); wait for it to "
                        f"finish, or delete {self.path} if that process is gone"
                    ) from None
                self._take_over_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
                handle.flush()
                os.fsync(handle.fileno())
            self.held = True
            return
        raise RunLockedError(
            f"{self.run_dir}: could not take the run lock {self.path} (another process keeps taking it); try again"
        )

    def _older_than(self, seconds: float) -> bool:
        import time

        try:
            return time.time() - self.path.stat().st_mtime > seconds
        except FileNotFoundError:
            return True

    def _take_over_stale(self) -> None:
        # Rename first: of two processes taking over the same stale lock, only one rename
        # succeeds; the other then finds the winner's fresh lock.
        aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file if this object still holds it."""
        if not self.held:
            return
        holder = self.read_holder()
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[RunLock | None]:
    """Hold the run lock of ``run_dir`` on the main process; every rank raises the same error if it is taken.

    Single-process runs need no distributed set-up; under ``accelerate launch`` the main
    process's outcome is broadcast to the other ranks before any of them continues.
    """
    from accelerate import PartialState

    state = PartialState()
    lock = RunLock(run_dir) if state.is_main_process else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except RunLockedError as exc:
            error = str(exc)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error], from_process=0)[0]
    if error is not None:
        raise RunLockedError(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
