"""Dividing end-of-task work among the ranks of a multi-process run (DDP, DeepSpeed ZeRO-2/3).

Under ``accelerate launch --num_processes N`` every rank reaches a callback's
``on_train_end``; the geometry and the merge of a task are divided among them by tensor
batches (:func:`assign_balanced`), each rank works on its share, and the main rank gathers
what the others computed (:func:`all_gather`) before writing the files that name every
tensor. Every function here is a no-op collective when ``torch.distributed`` is not
initialised (one process), so the one-process path is unchanged.

Failures: a rank that raises while the others wait in a collective would hang the job, so
every phase of work is closed by :func:`all_gather` of each rank's result *or* error message
(:func:`gather_guarded`, :func:`raise_if_any_failed`), and every rank raises together.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world()[1] > 1:
        dist.barrier()


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank; ``[value]`` in one process."""
    _, world_size = world()
    if world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value: Any) -> Any:
    """The main rank's ``value`` (picklable) on every rank; ``value`` itself in one process."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_if_any_failed(results: list[tuple[str | None, Any]], error: BaseException | None, what: str) -> None:
    """Called on every rank with the gathered ``(error message or None, result)`` pairs: if any
    rank failed, re-raise this rank's own error, or raise one naming the first rank that failed."""
    if error is not None:
        raise error
    for rank, (message, _) in enumerate(results):
        if message is not None:
            raise RuntimeError(f"{what}: rank {rank} failed: {message}")


def gather_guarded(compute: Callable[[], Any], what: str) -> list[Any]:
    """Every rank's ``compute()`` in rank order; if it raised on any rank, every rank raises.

    The one collective closing a phase of work: each rank runs its part, then all of them
    exchange ``(error message or None, result)``, so a rank that failed still takes part in
    the collective and the others learn of it there instead of waiting for it forever. The
    ranks must call it the same number of times, in the same order: whatever a rank may fail
    at on its own belongs inside ``compute``. One process: ``[compute()]``, an exception
    propagating as is."""
    if world()[1] == 1:
        return [compute()]
    error: BaseException | None = None
    result = None
    try:
        result = compute()
    except BaseException as exc:  # noqa: BLE001 - every rank must learn of it before anyone raises
        error = exc
    gathered = all_gather((None if error is None else f"{type(error).__name__}: {error}", result))
    raise_if_any_failed(gathered, error, what)
    return [value for _, value in gathered]


def assign_balanced(sizes: list[int], world_size: int) -> list[int]:
    """The rank that owns each item: largest items first, each to the least-loaded rank
    (ties: the lower rank), so the ranks' byte totals differ by at most one item.
    Deterministic (a function of ``sizes`` only), so every rank computes the same assignment
    without communicating."""
    owners = [0] * len(sizes)
    loads = [0] * world_size
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += sizes[index]
    return owners


def describe_split(what: str, shares: list[dict[str, Any]]) -> str:
    """One log line: ``<what> split over N ranks: rank 0: 12 tensors, 1.5 MB; rank 1: ...``."""
    parts = [
        f"rank {rank}: {share['tensors']} tensors, {share['bytes'] / 2**20:.1f} MB"
        + (f", {share['seconds']:.2f} s" if "seconds" in share else "")
        + (f" ({share['cpu_seconds']:.2f} CPU s)" if "cpu_seconds" in share else "")
        for rank, share in enumerate(shares)
    ]
    return f"{what} split over {len(shares)} ranks: " + "; ".join(parts)


def log(message: str) -> None:
    """A progress line on stderr (the main rank's choice of what to print is the caller's)."""
    print(f"[cpt] {message}", file=sys.stderr, flush=True)
