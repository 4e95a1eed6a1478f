"""``cpt study STUDY.yaml --workers N``: N processes on one study, each on its own GPU or its own cores.

A study's runs are independent once their experts exist, and each is taken under its run lock
(:class:`cpt.study.run._StudyWorker`), so several ``cpt study`` processes can share one study.
``--workers`` starts them and divides the machine between them:

* **GPUs** (CUDA visible): worker ``i`` sees one GPU, ``CUDA_VISIBLE_DEVICES`` = the ``i``-th
  visible one; ``N`` may not exceed the visible GPUs.
* **CPU**: worker ``i`` runs on its own slice of the cores this process may use
  (``os.sched_setaffinity``) with that many torch threads (``OMP_NUM_THREADS``), unless the user
  set ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` (then theirs is kept); ``N`` may not exceed the
  cores.

Each worker's full output goes to ``<study>/workers/worker-<i>.log``; this process prints their
``[cpt study]`` lines (which run each took, finished or put off) with the worker's number, waits
for all of them, then writes the study summary from the run directories. A Ctrl-C or SIGTERM to
this process alone is passed on to every worker (each stops cleanly; the same command resumes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cpt.errors import CptError
from cpt.stopping import pass_stop_on
from cpt.threads import THREAD_VARIABLES, available_cores

#: How long the workers get to stop on their own after a stop reached this process, before it is passed on.
STOP_GRACE_SECONDS = 5.0
#: How often the worker logs are read for new lines, in seconds.
FOLLOW_SECONDS = 2.0


@dataclass
class WorkerSlot:
    """What one worker gets of the machine."""

    env: dict[str, str]
    cores: list[int] | None = None
    """CPUs it is pinned to (None: not pinned)."""
    description: str = ""


def visible_gpus() -> list[str]:
    """The CUDA devices this process sees, as ``CUDA_VISIBLE_DEVICES`` entries (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return listed[:count] if listed else [str(index) for index in range(count)]


def worker_slots(workers: int, *, gpus: list[str] | None = None, environ=None, affinity=None) -> list[WorkerSlot]:
    """Divide the machine between ``workers`` processes (module docstring); a one-line error when it cannot."""
    environ = dict(os.environ if environ is None else environ)
    if workers < 1:
        raise CptError(f"--workers must be at least 1, got {workers}")
    gpus = visible_gpus() if gpus is None else gpus
    pinnable = affinity is not None or hasattr(os, "sched_setaffinity")  # not on macOS: threads only
    if affinity is None:
        affinity = os.sched_getaffinity(0) if pinnable else set(range(os.cpu_count() or 1))
    cores = sorted(affinity)
    usable = min(len(cores), available_cores(lambda: set(cores)))
    user_threads = any(environ.get(name) for name in THREAD_VARIABLES)
    if gpus:
        if workers > len(gpus):
            raise CptError(
                f"--workers {workers}: only {len(gpus)} GPU(s) visible ({', '.join(gpus)}); "
                f"use --workers {len(gpus)} or fewer"
            )
        threads = str(max(1, usable // workers))
        return [
            WorkerSlot(
                env={**environ, "CUDA_VISIBLE_DEVICES": gpu}
                | ({} if user_threads else dict.fromkeys(THREAD_VARIABLES, threads)),
                description=f"GPU {gpu}",
            )
            for gpu in gpus[:workers]
        ]
    if workers > usable:
        raise CptError(
            f"--workers {workers}: only {usable} CPU core(s) available to this process; use --workers {usable} or fewer"
        )
    slots = []
    for index in range(workers):
        share = cores[index * len(cores) // workers : (index + 1) * len(cores) // workers]
        threads = str(max(1, usable // workers))
        env = environ if user_threads else {**environ, **dict.fromkeys(THREAD_VARIABLES, threads)}
        threads_text = environ.get("OMP_NUM_THREADS") or environ.get("MKL_NUM_THREADS") or threads
        slots.append(
            WorkerSlot(
                env=dict(env),
                cores=share if pinnable else None,
                description=f"CPU core(s) {','.join(map(str, share))}, {threads_text} thread(s)",
            )
        )
    return slots


@dataclass
class _Follower:
    """New lines of one worker's log: the ``[cpt study]`` ones and errors, tqdm's ``\\r`` updates skipped."""

    path: Path
    offset: int = 0
    partial: str = ""
    lines: list[str] = field(default_factory=list)

    def read(self) -> list[str]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        text = self.partial + data.decode("utf-8", errors="replace")
        *complete, self.partial = text.replace("\r", "\n").split("\n")
        return [line for line in complete if line.startswith(("[cpt study]", "error:", "Traceback"))]


def run_workers(study, study_file: str, overrides: list[str], workers: int) -> int:
    """Start ``workers`` ``cpt study`` processes on ``study``, follow them, wait for all; 0 when all succeeded."""
    slots = worker_slots(workers)
    logs = study.root / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cpt.cli", "study", study_file]
    for override in overrides:
        command += ["--set", override]
    processes, followers = [], []
    for index, slot in enumerate(slots):
        path = logs / f"worker-{index}.log"
        with path.open("ab") as log_file:
            processes.append(
                subprocess.Popen(
                    command,
                    env=slot.env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=(lambda cores=slot.cores: os.sched_setaffinity(0, cores)) if slot.cores else None,
                )
            )
        follower = _Follower(path)
        follower.offset = path.stat().st_size  # only this sitting's lines
        followers.append(follower)
        _say(f"[cpt study] worker {index}: {slot.description}; log {path}")
    try:
        while any(process.poll() is None for process in processes):
            _echo(followers)
            time.sleep(FOLLOW_SECONDS)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM (cpt.stopping)
        pass_stop_on(processes, stop, grace_seconds=STOP_GRACE_SECONDS)
        _echo(followers)
        raise
    _echo(followers)
    failed = [(index, process.returncode) for index, process in enumerate(processes) if process.returncode != 0]
    for index, status in failed:
        _say(f"[cpt study] worker {index} exited with status {status}; its log: {followers[index].path}")
    return 1 if failed else 0


def _echo(followers: list[_Follower]) -> None:
    for index, follower in enumerate(followers):
        for line in follower.read():
            _say(f"[worker {index}] {line}")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = ["WorkerSlot", "run_workers", "visible_gpus", "worker_slots"]
