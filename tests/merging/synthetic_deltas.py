"""Synthetic task deltas for the merging math tests, and the error measure they compare with."""

import math

import torch

F64 = torch.float64


def delta(shape, rank=4, seed=0, scale=0.02, noise=1e-3, dtype=F64):
    """Low-rank-plus-noise delta ``[..., d_out, d_in]`` (the shape fine-tuning deltas have), drawn in float64."""
    g = torch.Generator().manual_seed(seed)
    *batch, d_out, d_in = shape
    b = torch.randn(*batch, d_out, rank, generator=g, dtype=F64)
    a = torch.randn(*batch, rank, d_in, generator=g, dtype=F64)
    x = scale * (b @ a) / math.sqrt(rank) + noise * torch.randn(*shape, generator=g, dtype=F64)
    return x.to(dtype)


def relative_error(a, b):
    """‖a − b‖ / ‖b‖ in float64 (Frobenius over all dimensions)."""
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))
