"""The exact k-th largest magnitude over a whole model, streamed in bounded memory.

Localize-and-Stitch (METHOD §3.B, ``scope: global``) and FusionBench's continual TIES
(METHOD §3, ``form: fusionbench``) threshold a vector by one magnitude over the whole
model. A streamed merge never holds the model, so the threshold is found by a two-pass
radix select on the float32 bit patterns: for non-negative floats the order of the values
is the order of their bits read as int32, so

1. pass 1 counts the values per upper 16 bits (32768 bins: the sign bit is 0) and finds
   the bin holding the k-th largest;
2. pass 2 counts the lower 16 bits of the values in that bin and finds the value itself.

The result is exact (it is one of the values, bit for bit, the one ``torch.topk`` over the
concatenation would return), the memory is two histograms, and each pass reads the model
once. Several vectors ("channels") are thresholded in the same two passes.

Split over ranks (each streaming its own share of the tensors), the histograms and sizes of
every rank are summed after each pass (``gather``): counts add exactly, so every rank finds
the same value as one process over the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

_HIGH_BINS = 1 << 15  # |x| has sign bit 0: the upper 16 bits are < 2^15
_LOW_BINS = 1 << 16


def _bits(values: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns of ``|values|`` as int64 (monotone in the magnitude)."""
    return values.detach().to(torch.float32).abs().reshape(-1).contiguous().view(torch.int32).long()


def _locate(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """``(bin, rank within the bin)`` of the ``rank``-th largest (1-based) item of a histogram."""
    from_top = counts.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor([rank], dtype=from_top.dtype, device=from_top.device)))
    above = int(from_top[index - 1]) if index > 0 else 0
    return counts.numel() - 1 - index, rank - above


def _summed(parts: list[T]) -> T:
    """Every rank's histograms (or sizes) added channel by channel; one rank's as they are."""
    if len(parts) == 1:
        return parts[0]
    return [sum(channel[1:], channel[0]) for channel in zip(*parts, strict=True)]


def kth_largest_magnitudes(
    stream: Callable[[], Iterable[Sequence[torch.Tensor]]],
    ranks: Sequence[int | Callable[[int], int]],
    gather: Callable[[Callable[[], T]], list[T]] | None = None,
) -> list[float]:
    """The ``ranks[c]``-th largest ``|x|`` (1-based) of each channel ``c`` over a stream.

    ``stream()`` is called twice and must yield the same tensors both times: per chunk one
    tensor per channel (any shapes). A rank may be a function of the channel's total size
    (known after the first pass), e.g. ``lambda size: int(0.1 * size)``. A rank of 0 gives
    ``inf`` (nothing is that large); a rank above the channel's size gives ``0.0``
    (everything is at least that large).

    ``gather``: in a merge split over processes, runs a pass over this process's share and
    returns every process's result (:func:`cpt.merging.contract.gather_shares`); the
    histograms are summed, so the value is the one over every share. None: one process.
    """
    gather = gather or (lambda compute: [compute()])
    channels = len(ranks)

    def first_pass() -> tuple[list[torch.Tensor], list[int]]:
        high = [torch.zeros(_HIGH_BINS, dtype=torch.long) for _ in range(channels)]
        sizes = [0] * channels
        for chunk in stream():
            for c, values in enumerate(chunk):
                bits = _bits(values)
                sizes[c] += bits.numel()
                high[c] += torch.bincount(bits >> 16, minlength=_HIGH_BINS).cpu()
        return high, sizes

    passes = gather(first_pass)
    high, sizes = _summed([part[0] for part in passes]), _summed([part[1] for part in passes])
    ranks = [rank(sizes[c]) if callable(rank) else int(rank) for c, rank in enumerate(ranks)]
    located: list[tuple[int, int] | None] = []
    for c, rank in enumerate(ranks):
        located.append(_locate(high[c], rank) if 0 < rank <= sizes[c] else None)
    if all(entry is None for entry in located):
        return [float("inf") if rank <= 0 else 0.0 for rank in ranks]

    def second_pass() -> list[torch.Tensor]:
        low = [torch.zeros(_LOW_BINS, dtype=torch.long) for _ in range(channels)]
        for chunk in stream():
            for c, values in enumerate(chunk):
                if located[c] is None:
                    continue
                bits = _bits(values)
                inside = bits[(bits >> 16) == located[c][0]]
                low[c] += torch.bincount(inside & 0xFFFF, minlength=_LOW_BINS).cpu()
        return low

    low = _summed(gather(second_pass))
    result = []
    for c, rank in enumerate(ranks):
        if located[c] is None:
            result.append(float("inf") if rank <= 0 else 0.0)
            continue
        high_bin, rank_in_bin = located[c]
        low_bin, _ = _locate(low[c], rank_in_bin)
        pattern = torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32)
        result.append(float(pattern.view(torch.float32)[0]))
    return result
