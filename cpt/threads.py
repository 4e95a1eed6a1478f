"""CPU threads for a training process: every core the process is entitled to, unless the user chose.

``accelerate launch`` gives its child ``OMP_NUM_THREADS=1`` whenever the caller did not set it
(accelerate 1.x ``commands/launch.py``; only ``--cpu`` picks physical cores / local processes),
so the README's ``accelerate launch cpt/run.py recipe.yaml`` trained on one core of two. The
child cannot tell that ``1`` from a user's ``OMP_NUM_THREADS=1`` by looking at its own
environment, so :func:`configure_cpu_threads` reads the *launcher's* environment as it was when
the launcher started (``/proc/<pid>/environ`` holds the environment a process was executed
with, not what it set later): if the user's shell gave the launcher no thread count, the
count accelerate put there is replaced by ``cores available / local processes``.

Cores available = the CPUs this process may run on (``os.sched_getaffinity``), capped by a
cgroup CPU quota when one is set (containers, Slurm, Kubernetes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: The variables through which a user chooses a thread count (any one of them counts).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Variables ``accelerate launch`` puts in its child's environment (any one of them marks the child).
_ACCELERATE_CHILD_MARKERS = ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    """The intra-op thread count this process uses."""
    reason: str
    """One line for the log: where the count came from."""


def available_cores(affinity: Callable[[], set[int]] | None = None, cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on, capped by a cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_*``) quota."""
    try:
        cores = len((affinity or (lambda: os.sched_getaffinity(0)))())
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota(root: Path) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _process_environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def _process_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent_pid(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def launcher_environment(pid: int | None = None, max_depth: int = 8) -> dict[str, str] | None:
    """The environment the nearest ``accelerate`` ancestor process was started with, or None.

    The environment of ``accelerate launch`` as the user's shell gave it: the launcher sets the
    child's variables in a copy (or patches its own ``os.environ``, which ``/proc/<pid>/environ``
    does not show), so this is what the user chose.
    """
    current = os.getppid() if pid is None else pid
    for _ in range(max_depth):
        if current is None or current <= 1:
            return None
        if "accelerate" in _process_cmdline(current):
            return _process_environ(current)
        current = _parent_pid(current)
    return None


def configure_cpu_threads(
    environ: Mapping[str, str] | None = None,
    launcher_env: Callable[[], dict[str, str] | None] = launcher_environment,
    cores: Callable[[], int] = available_cores,
    set_threads: Callable[[int], None] | None = None,
) -> ThreadChoice:
    """Use every core this process is entitled to unless the user chose a thread count.

    Rules, in order:

    * a thread count the user set (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` in the environment
      they started cpt with) is kept;
    * under ``accelerate launch``, a count accelerate put there by default (the launcher was
      started without one) is replaced by ``cores available // local processes`` (at least 1);
    * otherwise torch's own default stands (it already uses the physical cores).

    The chosen count is applied with ``torch.set_num_threads`` and written back to
    ``OMP_NUM_THREADS`` so processes started later (dataset workers) inherit it.
    """
    env = os.environ if environ is None else environ
    user_count = next((env[name] for name in THREAD_VARIABLES if env.get(name)), None)
    under_accelerate = any(name in env for name in _ACCELERATE_CHILD_MARKERS)
    if user_count is not None and under_accelerate:
        parent = launcher_env()
        if parent is not None and not any(parent.get(name) for name in THREAD_VARIABLES):
            user_count = None  # accelerate's default of 1, not the user's choice
        elif parent is None:
            return ThreadChoice(
                _current_threads(),
                f"{_current_threads()} CPU threads (OMP_NUM_THREADS={user_count}; cannot tell whether accelerate or you "
                "set it: set OMP_NUM_THREADS or pass --num_cpu_threads_per_process to choose)",
            )
    if user_count is not None:
        return ThreadChoice(
            _current_threads(), f"{_current_threads()} CPU threads (set by you: OMP_NUM_THREADS/MKL_NUM_THREADS)"
        )
    if not under_accelerate:
        return ThreadChoice(_current_threads(), f"{_current_threads()} CPU threads (torch's default)")
    local_processes = max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))
    available = cores()
    threads = max(1, available // local_processes)
    (set_threads or _set_threads)(threads)
    if environ is None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return ThreadChoice(
        threads,
        f"{threads} CPU threads ({available} cores available / {local_processes} local process"
        f"{'es' if local_processes > 1 else ''}; set OMP_NUM_THREADS to choose)",
    )


def _current_threads() -> int:
    import torch

    return torch.get_num_threads()


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
