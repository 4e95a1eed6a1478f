"""How a cpt command stops when it is asked to: Ctrl-C (SIGINT) and SIGTERM take the same clean stop.

Python turns SIGINT into :class:`KeyboardInterrupt`, which unwinds a run through its ``finally``
blocks and leaves a run directory that the same command resumes (integration is staged and
renamed, the manifest written atomically). SIGTERM — what schedulers (Slurm, Kubernetes,
systemd, ``timeout``) and ``kill`` send — would instead end the process on the spot, skipping
that unwinding, the one-line message and whatever a parent process records about the stop.
:func:`sigterm_stops_cleanly` makes SIGTERM raise :class:`Terminated`, a ``KeyboardInterrupt``,
so every ``except KeyboardInterrupt`` in cpt handles both; the exit status then says which signal
it was (130 for SIGINT, 143 for SIGTERM, the shell's ``128 + signal``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises ``KeyboardInterrupt`` so that both take the same clean stop."""


#: Set by the SIGTERM handler: a stop was asked for (within :func:`sigterm_stops_cleanly`).
_stop_requested = False
#: The process that installed the handler; a forked child (a dataloader or ``datasets.map`` worker) inherits it.
_installed_by: int | None = None


def _raise_terminated(signum, frame) -> None:
    global _stop_requested
    if os.getpid() != _installed_by:
        # A forked worker: pools end their workers with SIGTERM (multiprocessing's terminate(), which a
        # `with Pool()` calls on exit), and a worker raising here would print a traceback. It ends as by default.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _stop_requested = True
    if _inside_finalizer(frame):
        # Python prints and drops an exception raised in a __del__ ("Exception ignored in ..."), and the
        # handler runs wherever the interpreter happens to be — often a finalizer that a C call's freeing
        # triggered (found with datasets' Dataset.__del__): ask again a moment later instead.
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    raise Terminated


def raise_if_stop_requested() -> None:
    """Raise :class:`Terminated` again if SIGTERM came and its exception was swallowed on the way.

    Libraries may catch everything: datasets' fingerprinting hashes a transform under a bare
    ``except:`` (found when a SIGTERM landed there and the run went on to finish). cpt calls this
    where it regains control — between tasks, between runs, at every training step — so such a
    stop is only delayed, never lost.
    """
    if _stop_requested:
        raise Terminated


def _inside_finalizer(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def sigterm_stops_cleanly() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (module docstring); the previous handler after.

    Nothing is changed outside the main thread (Python only runs signal handlers there) or when the
    process already has a SIGTERM handler of its own (a launcher's, a user's script's): that one is kept.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return
    global _stop_requested, _installed_by
    _installed_by = os.getpid()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_requested = False


def pass_stop_on(processes: list[subprocess.Popen], stop: KeyboardInterrupt, grace_seconds: float) -> None:
    """After ``stop`` reached this process, let ``processes`` stop and wait for them all.

    A Ctrl-C at a terminal (or a SIGTERM to the process group) reached the children too: they get
    ``grace_seconds`` to stop cleanly on their own; any still running then gets the same signal
    (this process alone was signalled, as a scheduler or ``kill PID`` does).
    """
    deadline = time.monotonic() + grace_seconds
    while any(process.poll() is None for process in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    for process in processes:
        if process.poll() is None:
            process.send_signal(stop_signal(stop))
    for process in processes:
        process.wait()


def stop_signal(stop: KeyboardInterrupt) -> signal.Signals:
    """The signal that caused ``stop``: SIGTERM for :class:`Terminated`, else SIGINT."""
    return signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT


def stop_exit_status(stop: KeyboardInterrupt) -> int:
    """The exit status a shell gives a process that ``stop``'s signal ended: ``128 + signal`` (130, 143)."""
    return 128 + int(stop_signal(stop))


def stop_message(stop: KeyboardInterrupt) -> str:
    """The one line a stopped command prints."""
    how = "stopped by SIGTERM" if isinstance(stop, Terminated) else "interrupted"
    return f"{how}; run the same command again to resume"


__all__ = [
    "Terminated",
    "pass_stop_on",
    "raise_if_stop_requested",
    "sigterm_stops_cleanly",
    "stop_exit_status",
    "stop_message",
    "stop_signal",
]
