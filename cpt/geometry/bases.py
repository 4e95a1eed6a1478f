"""Right spectral bases, union bases and projected covariances (METHOD.md §1).

All functions are tensor-in, tensor-out and batched over leading dimensions: a delta
is ``[..., d_out, d_in]`` (dense) or a :class:`LowRankDelta`; every batch element is
computed exactly as it would be on its own (batched equals unbatched up to rounding,
~1e-15 in float64). Results follow the input's device. Spectral quantities (bases,
singular values, covariances) are returned in float64.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Union

import numpy
import torch
from torch import Tensor

from . import lapack

__all__ = [
    "LowRankDelta",
    "RightBasis",
    "Delta",
    "right_basis",
    "frobenius_norm",
    "apply_right",
    "union_basis",
    "projected_covariance",
    "compute_dtype_for",
    "gram_path_threads",
    "geometry_worker_threads",
    "one_blas_thread",
    "one_thread_worker",
    "small_linalg",
    "takes_gram_path",
    "UNION_DROP_TOL",
]

#: Columns of the union QR with ``|R_ii|`` at or below this are dropped (METHOD §1).
UNION_DROP_TOL = 1e-8


@dataclass
class LowRankDelta:
    """A delta in PEFT LoRA form, ``Δ = scale · lora_B @ lora_A`` (METHOD §1, LoRA case).

    ``lora_B`` is ``[..., d_out, r]``, ``lora_A`` is ``[..., r, d_in]``; ``scale`` is a
    float (PEFT's ``lora_alpha / r``) or a tensor broadcastable to the batch shape
    ``[...]``. The dense product is never formed by this package.
    """

    lora_B: Tensor
    lora_A: Tensor
    scale: float | Tensor = 1.0

    def __post_init__(self) -> None:
        if self.lora_B.dim() < 2 or self.lora_A.dim() < 2:
            raise ValueError("LowRankDelta: lora_B and lora_A must be at least 2-D")
        if self.lora_B.shape[-1] != self.lora_A.shape[-2]:
            raise ValueError(
                f"LowRankDelta: lora_B {tuple(self.lora_B.shape)} and lora_A "
                f"{tuple(self.lora_A.shape)} disagree on the rank dimension"
            )
        if self.lora_B.shape[:-2] != self.lora_A.shape[:-2]:
            raise ValueError("LowRankDelta: lora_B and lora_A must have the same batch shape")

    @property
    def shape(self) -> torch.Size:
        """The shape of the dense delta, ``[..., d_out, d_in]``."""
        return torch.Size((*self.lora_B.shape[:-1], self.lora_A.shape[-1]))

    @property
    def batch_shape(self) -> torch.Size:
        return self.lora_B.shape[:-2]

    @property
    def device(self) -> torch.device:
        return self.lora_B.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self.lora_B.dtype, self.lora_A.dtype)

    def scale_tensor(self, dtype: torch.dtype) -> Tensor:
        """``scale`` as a tensor of shape ``[..., 1, 1]`` (broadcastable to the factors)."""
        s = torch.as_tensor(self.scale, dtype=dtype, device=self.device)
        return s.expand(self.batch_shape).reshape(*self.batch_shape, 1, 1)

    def to_dense(self) -> Tensor:
        """The dense delta (for tests and small tensors only)."""
        dt = self.dtype
        return self.scale_tensor(dt) * (self.lora_B.to(dt) @ self.lora_A.to(dt))


Delta = Union[Tensor, LowRankDelta]  # noqa: UP007 (a runtime alias: `|` needs both operands to be types at import)


@dataclass
class RightBasis:
    """Energy-truncated right singular basis of a delta (METHOD §1, "Right spectral basis").

    - ``basis``: ``[..., d_in, r_max]`` float64, the top right singular vectors ``V_Δ``;
    - ``singular_values``: ``[..., r_max]`` float64, ``S_Δ`` in descending order;
    - ``ranks``: ``[...]`` long, the kept ``r = min(rank, r_E)`` per element;
    - ``squared_norm``: ``[...]`` float64, ``‖Δ‖_F²`` (the total energy).

    ``r_max`` is the largest ``r`` in the batch; columns/values past an element's own
    ``r`` are exactly zero, so they contribute nothing downstream.
    """

    basis: Tensor
    singular_values: Tensor
    ranks: Tensor
    squared_norm: Tensor

    def covariance(self) -> Tensor:
        """``Σ_Δ = V_Δ S_Δ² V_Δᵀ`` ``[..., d_in, d_in]`` float64 (METHOD §1, covariance geometry)."""
        v = self.basis
        return (v * self.singular_values.square().unsqueeze(-2)) @ v.mT


# --------------------------------------------------------------------------- helpers


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Working precision for large products with a delta of ``dtype`` (METHOD §1 bases,
    SAR and norms; the float64 requirement applies to eigendecompositions and roots).

    float64 stays float64 (exact tests); everything else (float32, bf16, fp16) works in
    float32. Small eigenproblems are always float64.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_delta(delta: Delta) -> None:
    if isinstance(delta, LowRankDelta):
        return
    if not isinstance(delta, Tensor):
        raise TypeError(f"delta must be a Tensor or LowRankDelta, got {type(delta).__name__}")
    if delta.dim() < 2:
        raise ValueError(f"delta must be [..., d_out, d_in], got shape {tuple(delta.shape)}")
    if not (delta.is_floating_point()):
        raise TypeError(f"delta must be floating point, got {delta.dtype}")


#: Small dense factorizations (eigendecompositions of ``k × k`` Ritz matrices and covariances,
#: QR of ``d_in × k`` bases), and whole geometry computations on the Gram path
#: (:func:`gram_path_threads`), run on one torch thread on the CPU. They are far too small to gain
#: from a second thread, and on a machine shared with other processes every extra OpenMP thread
#: waits at each barrier for a core: measured on the loaded 2-core machine (load average ~5–10),
#: a ``[4, 576, 64]`` float64 QR took 105 ms with two threads and 3.7 ms with one, a
#: ``[4, 64, 64]`` eigh 15 ms and 2 ms, and these calls were 70 % of the geometry's wall time.
#: Results move by rounding only (MKL's bits depend on its thread count). ``False``: the
#: process's thread count (the earlier behaviour, kept for benchmarks/geometry_quickstart_speed.py).
SMALL_LINALG_ONE_THREAD = True


#: The eigensolve pool's size while torch is held at one thread, per calling thread (read by
#: :func:`_solver_threads`): the process's count inside :func:`small_linalg`, 1 in a worker of a
#: split geometry computation (:func:`one_thread_worker`).
_one_thread_scope = threading.local()


@contextlib.contextmanager
def _torch_on_one_thread(solver_threads: int) -> Iterator[None]:
    """Torch on one thread in the calling thread (OpenMP's and MKL's counts are per calling thread)
    and the eigensolve pool at ``solver_threads``; both restored on exit."""
    threads, outer = torch.get_num_threads(), getattr(_one_thread_scope, "threads", None)
    _one_thread_scope.threads = solver_threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _one_thread_scope.threads = outer


@contextlib.contextmanager
def small_linalg(device: torch.device | str) -> Iterator[None]:
    """One torch thread for the enclosed small factorizations on the CPU (see
    :data:`SMALL_LINALG_ONE_THREAD`); the thread count is restored on exit. A no-op on other
    devices. OpenMP's thread count is per calling thread, so concurrent callers do not interfere."""
    threads = torch.get_num_threads()
    if not SMALL_LINALG_ONE_THREAD or torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    with _torch_on_one_thread(solver_threads=threads):  # the eigensolve pool still sizes itself by the process's count
        yield


def geometry_worker_threads(device: torch.device | str) -> int:
    """How many threads a whole-model geometry computation on ``device`` splits its tensors over
    (:func:`cpt.diagnostics.pair_geometry`): on the CPU, :data:`GRAM_SOLVER_THREADS` or the
    process's torch thread count when the Gram eigensolves release the GIL
    (:func:`cpt.geometry.lapack.available`); 1 elsewhere.

    Why split whole tensors rather than only the eigensolves: every per-tensor step (casts, thin
    products, ``k × k`` eigendecompositions, QR, Bures roots) is too small to gain from a second
    OpenMP thread, so with only the eigensolves concurrent a quickstart step still ran ~2 s of
    torch work on one core of two. Each tensor's result does not depend on which tensors share
    its batch, so the split changes no number (tests/geometry/test_geometry_speedups.py).
    """
    if torch.device(device).type != "cpu" or not lapack.available():
        return 1
    return _solver_threads()


def one_thread_worker() -> contextlib.AbstractContextManager:
    """The scope of one worker thread of a split geometry computation (:func:`geometry_worker_threads`):
    torch on one thread and no nested eigensolve pool (:func:`_solver_threads` reads 1): the split
    is the parallelism."""
    return _torch_on_one_thread(solver_threads=1)


def takes_gram_path(
    shape: tuple[int, ...] | torch.Size, device: torch.device | str, rank: int = 32, oversample: int | None = None
) -> bool:
    """Whether :func:`right_basis` (``method="auto"``) decomposes a dense ``[..., m, n]`` delta
    on ``device`` by the Gram path: smaller side ≤ ``max(256, 4·sketch)``, on the CPU also
    ≤ :data:`GRAM_AUTO_MAX_SIDE_CPU`."""
    small = min(shape[-2:])
    sketch = min(rank + (rank if oversample is None else oversample), small)
    cpu_side = GRAM_AUTO_MAX_SIDE_CPU if torch.device(device).type == "cpu" else 0
    return small <= max(256, 4 * sketch, cpu_side)


def gram_path_threads(deltas: list[Delta], rank: int, device: torch.device | str) -> contextlib.AbstractContextManager:
    """One torch thread on the CPU (:func:`small_linalg`) for a geometry computation whose dense
    deltas all take the Gram path (LoRA deltas only need small factorizations); a no-op otherwise.

    There the heavy work is the per-matrix eigensolves, run concurrently by their own pool
    (:data:`GRAM_SOLVER_THREADS`); what torch does around them (stacking, casts, thin products,
    ``k × k`` matrices) is light, and with two OpenMP threads on a shared machine every one of
    those ops paid for the idle thread's spinning: measured on SmolLM2-135M shapes at load
    average ~3.7 on 2 cores, the whole computation took 2.2–2.5× the wall time of one thread.
    The randomized path (larger sides) keeps the process's threads for its big products."""
    dense = [delta for delta in deltas if not isinstance(delta, LowRankDelta)]
    if all(takes_gram_path(delta.shape, device, rank) for delta in dense):
        return small_linalg(device)
    return contextlib.nullcontext()


def _desc_eigh(h: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition with eigenvalues in descending order."""
    with small_linalg(h.device):
        evals, evecs = torch.linalg.eigh(h)
    return evals.flip(-1), evecs.flip(-1)


def _orthonormal(a: Tensor) -> Tensor:
    """``Q`` of the reduced QR of ``a`` (a small factorization, :func:`small_linalg`)."""
    with small_linalg(a.device):
        return torch.linalg.qr(a).Q


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.mT)


def _truncation_rank(values: Tensor, squared_norm: Tensor, rank: int, energy: float) -> Tensor:
    """``r = min(rank, r_E)`` from descending singular values (METHOD §1).

    ``r_E`` is the smallest r with ``Σ_{i≤r} s_i² ≥ energy · ‖Δ‖_F²``. Only the leading
    values need to be known: if they never reach the target, ``r_E`` exceeds them and
    ``r = rank`` (capped by the number of values available). A relative slack of 1e-12
    on the target keeps rounding from adding a numerically-zero direction when
    ``energy = 1``. A zero delta has rank 0.
    """
    cum = values.square().cumsum(-1)
    target = (energy * (1.0 - 1e-12)) * squared_norm
    r_energy = (cum < target.unsqueeze(-1)).sum(-1) + 1
    r = torch.clamp(r_energy, max=min(rank, values.shape[-1]))
    # Never keep exactly-zero directions, and a zero delta has rank 0.
    r = torch.minimum(r, (values > 0).sum(-1))
    return torch.where(squared_norm > 0, r, torch.zeros_like(r))


def _package(v: Tensor, s: Tensor, sq_norm: Tensor, rank: int, energy: float, batch_shape: torch.Size) -> RightBasis:
    """Truncate (``v [B, d_in, l]``, ``s [B, l]`` descending) and pad with zeros."""
    r = _truncation_rank(s, sq_norm, rank, energy)
    r_max = int(r.max().item()) if r.numel() else 0
    v = v[..., :r_max]
    s = s[..., :r_max]
    keep = torch.arange(r_max, device=v.device) < r.unsqueeze(-1)
    v = v * keep.unsqueeze(-2).to(v.dtype)
    s = s * keep.to(s.dtype)
    d_in = v.shape[-2]
    return RightBasis(
        basis=v.reshape(*batch_shape, d_in, r_max),
        singular_values=s.reshape(*batch_shape, r_max),
        ranks=r.reshape(batch_shape),
        squared_norm=sq_norm.reshape(batch_shape),
    )


# ------------------------------------------------------------------- norms, products


def frobenius_norm(delta: Delta) -> Tensor:
    """``‖Δ‖_F`` per batch element, float64 ``[...]`` (METHOD §1, SAR and ``‖Δ_t‖_F``).

    Dense deltas are reduced in their working precision (:func:`compute_dtype_for`) and
    returned as float64.

    For a :class:`LowRankDelta` it is ``|scale| · sqrt(tr((BᵀB)(AAᵀ)))``, computed from
    ``r × r`` Gram matrices without forming ``B A``.
    """
    _check_delta(delta)
    if isinstance(delta, LowRankDelta):
        b = delta.lora_B.to(torch.float64)
        a = delta.lora_A.to(torch.float64)
        gram_b = b.mT @ b
        gram_a = a @ a.mT
        sq = (gram_b * gram_a).sum((-2, -1)).clamp_min(0.0)
        scale = delta.scale_tensor(torch.float64)[..., 0, 0]
        return scale.abs() * sq.sqrt()
    cdt = compute_dtype_for(delta.dtype)
    return torch.linalg.vector_norm(delta.to(cdt), dim=(-2, -1)).to(torch.float64)


def apply_right(delta: Delta, matrix: Tensor) -> Tensor:
    """``Δ @ M`` for a dense or LoRA delta (METHOD §1, used by SAR ``Δ_i V_j``).

    ``matrix`` is ``[..., d_in, c]`` (batch-broadcastable). The product is computed in the
    delta's working precision (:func:`compute_dtype_for`: float64 for float64 deltas,
    float32 otherwise); for a :class:`LowRankDelta` as ``scale · B (A M)``, never forming
    ``B A``.
    """
    _check_delta(delta)
    cdt = compute_dtype_for(delta.dtype)
    m = matrix.to(cdt)
    if isinstance(delta, LowRankDelta):
        am = delta.lora_A.to(cdt) @ m
        return delta.scale_tensor(cdt) * (delta.lora_B.to(cdt) @ am)
    return delta.to(cdt) @ m


# ---------------------------------------------------------------------- right basis


def _lowrank_right_basis(delta: LowRankDelta, rank: int, energy: float) -> RightBasis:
    # Δ = s·B A = s·(Q_B R_B)(Q_A R_A)ᵀ = Q_B (s R_B R_Aᵀ) Q_Aᵀ: the SVD of the small core
    # C = U_c S W_cᵀ gives Δ's right singular vectors Q_A W_c exactly.
    batch_shape = delta.batch_shape
    b = delta.lora_B.to(torch.float64)
    a = delta.lora_A.to(torch.float64)
    d_out, r_lora = b.shape[-2:]
    d_in = a.shape[-1]
    b = b.reshape(-1, d_out, r_lora)
    a = a.reshape(-1, r_lora, d_in)
    scale = delta.scale_tensor(torch.float64).reshape(-1, 1, 1)
    with small_linalg(b.device):
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(a.mT)
        core = scale * (r_b @ r_a.mT)
        _, s, w_t = torch.linalg.svd(core, full_matrices=False)
    v = q_a @ w_t.mT
    sq_norm = core.square().sum((-2, -1))
    return _package(v, s, sq_norm, rank, energy, batch_shape)


#: On the CPU, the Gram path forms only the upper triangle of the Gram matrix (BLAS
#: ``dsyrk``, ~1.6× less time than a full product) and asks LAPACK's ``dsyevr`` for the
#: top ``k`` eigenpairs only (``scipy.linalg.eigh(subset_by_index=...)``, 2–3× less time
#: than a full ``torch.linalg.eigh`` of a 576×576 matrix): the same float64 pairs to
#: rounding (~1e-15), the eigenvectors of the discarded spectrum never formed. This is the
#: path every flat-spectrum delta ends in (a full fine-tune's update: the pairs needed for
#: 95 % of the energy reach into the noise bulk, where no randomized solver certifies).
#: ``False``: the full product and eigendecomposition (the earlier path, kept for
#: benchmarks/geometry_quickstart_speed.py and for devices other than the CPU).
GRAM_SUBSET_EIGH = True

#: On the CPU, ``method="auto"`` takes the exact Gram path for every delta whose smaller side
#: is at most this (besides the small ones, ``min(d) ≤ max(256, 4·sketch)``); 0 turns it off.
#: Why: a full fine-tune's update decays slowly past the kept rank (SmolLM2-135M quickstart,
#: θ3 − θ0: ``s_32/s_65`` ≈ 1.5–1.8), so the randomized solver needs 8–12 iterations to
#: certify its pairs, ~45 ms for a 576×1536 tensor on one core, while the exact float64 Gram
#: eigensolve takes ~28 ms (``dsyrk`` 11 ms + ``dsyevr`` top-32 17 ms). At 1024 (Qwen3-0.6B)
#: the eigensolve alone grows as ``d³`` (84 ms, plus ~65 ms for a 3072×1024 product), the
#: price of 10–15 randomized iterations there, so larger sides stay randomized. Both paths
#: satisfy METHOD §1 ("match a dense SVD"); the Gram one exactly, the randomized one to its
#: residual certificate, so switching moves results by at most that certificate (measured on
#: the quickstart's real deltas: conflicts 4.0e-7, SAR 4.4e-6; tests/geometry/test_geometry_speedups.py).
GRAM_AUTO_MAX_SIDE_CPU = 768

#: Gram eigensolves run concurrently on the CPU, one per thread and each with one BLAS thread
#: (scipy releases the GIL in BLAS/LAPACK; every matrix is solved exactly as on its own, so
#: the results are bit-identical to the serial loop). ``None``: ``torch.get_num_threads()``
#: (the intra-op count the process chose, :mod:`cpt.threads`); 1: the serial loop.
GRAM_SOLVER_THREADS: int | None = None

#: On the CPU, the Gram path of a float32/bf16/fp16 delta finds its top-``k`` subspace in float32
#: (``ssyrk`` for the Gram product, ``ssyevr`` for its eigenpairs: ~60 % and ~65 % of the float64
#: calls' time, and no float64 copy of the delta) and takes the pairs from a float64
#: Rayleigh–Ritz step on that subspace (``V ← orth(V)``, float64 eigendecomposition of
#: ``(ΔV)ᵀ(ΔV)``), so the returned singular pairs come from a float64 eigensolve as before.
#: Error bound: the float32 Gram carries ~1e-7·λ_1 of rounding, far below what a float32 delta
#: already carries (``θ_t − θ0`` of float32 weights: ~1e-7·‖θ‖/‖Δ‖ per entry, ~1e-5 relative for
#: a fine-tuning update); to keep it away from directions whose energy float32 cannot resolve,
#: an element whose ``k``-th eigenvalue is below :data:`GRAM_WORKING_FLOOR` ``· λ_1`` (a nearly
#: low-rank delta asked for more pairs than it has) is recomputed in float64. Measured against
#: the float64 Gram path (benchmarks/geometry_quickstart_speed.py ``--baseline float64``, all
#: 203–210 SmolLM2-135M target tensors): real deltas (θ3 − θ0 of the quickstart) conflicts
#: ≤ 4.8e-8, SAR ≤ 1.6e-7; flat synthetic ones ≤ 8.7e-8 and ≤ 5.6e-7 — the earlier randomized
#: path sat 4.0e-7 and 4.4e-6 from the exact answer on the real deltas. Ranks never changed.
#: tests/geometry/test_geometry_speedups.py bounds it.
#: float64 deltas keep the float64 path bit for bit. ``False``: float64 throughout (the earlier path).
GRAM_WORKING_PRECISION = True

#: See :data:`GRAM_WORKING_PRECISION`: the float32 subspace is trusted when ``λ_k ≥ floor · λ_1``
#: (``s_k/s_1 ≥ 1e-2``; a fine-tuning update's ``s_32/s_1`` is 0.07–0.2, and float32's Gram
#: rounding sits near ``1e-7 · λ_1``).
GRAM_WORKING_FLOOR = 1e-4


def _gram_precision(d: Tensor) -> torch.dtype:
    if GRAM_WORKING_PRECISION and GRAM_SUBSET_EIGH and d.device.type == "cpu":
        return compute_dtype_for(d.dtype)
    return torch.float64


def _solver_threads() -> int:
    """Concurrent Gram eigensolves: :data:`GRAM_SOLVER_THREADS`, else the process's torch thread
    count (the one before a :func:`small_linalg` scope set torch to one thread)."""
    if GRAM_SOLVER_THREADS is not None:
        return max(1, GRAM_SOLVER_THREADS)
    return max(1, getattr(_one_thread_scope, "threads", None) or torch.get_num_threads())


def _gram_top_eigh(d: Tensor, k: int, right: bool) -> tuple[Tensor, Tensor]:
    """Top-``k`` float64 eigenpairs, descending, of ``dᵀd`` (``right``) or ``d dᵀ`` for ``d [B, m, n]``
    (float64, or float32 on the CPU: see :data:`GRAM_WORKING_PRECISION`)."""
    size = d.shape[-1] if right else d.shape[-2]
    if not GRAM_SUBSET_EIGH or d.device.type != "cpu" or not 0 < k < size:
        d = d.to(torch.float64)
        evals, evecs = _desc_eigh(_sym(d.mT @ d) if right else _sym(d @ d.mT))
        return evals[..., :k], evecs[..., :k]
    matrices = d.contiguous().numpy()
    workers = min(len(matrices), _solver_threads())

    nogil = lapack.available()  # lets the pool's threads run side by side (scipy's wrappers hold the GIL)

    def solve(index: int):
        if nogil:
            return lapack.gram_top_pairs(matrices[index], k, right)
        return _top_pairs(matrices[index], k, size, right)

    with one_blas_thread():
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cpt-gram") as pool:
                pairs = list(pool.map(solve, range(len(matrices))))
        else:
            pairs = [solve(index) for index in range(len(matrices))]
    values = torch.from_numpy(numpy.stack([w for w, _ in pairs]))
    vectors = torch.from_numpy(numpy.stack([v for _, v in pairs]))
    return values, vectors


def one_blas_thread():
    """scipy's BLAS/LAPACK on one thread for the small Gram solves (a few hundred rows gain
    nothing from more, and on a machine shared with other processes the extra threads spin:
    measured 4–6× slower with two threads on the loaded 2-core machine). A no-op when
    ``threadpoolctl`` is not installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _top_pairs(matrix, k: int, size: int, right: bool):
    """One ``matrix [m, n]`` (numpy float32 or float64): its Gram's top-``k`` pairs ``(values [k],
    vectors [size, k])`` as float64 arrays, descending, computed in the matrix's precision."""
    import scipy.linalg
    from scipy.linalg import blas

    # matrix.T is a Fortran-ordered view (no copy): syrk(a, trans=0) = a aᵀ = dᵀd and
    # syrk(a, trans=1) = aᵀ a = d dᵀ, upper triangle only, which eigh(lower=False) reads.
    syrk = blas.ssyrk if matrix.dtype == numpy.float32 else blas.dsyrk
    gram = syrk(1.0, matrix.T, trans=0 if right else 1, lower=0)
    w, v = scipy.linalg.eigh(
        gram, lower=False, subset_by_index=[size - k, size - 1], driver="evr", overwrite_a=True, check_finite=False
    )
    # dsyevr/ssyevr: ascending
    return w[::-1].astype(numpy.float64), v[:, ::-1].astype(numpy.float64)


def _gram_right_basis(d: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` right singular pairs of ``d [B, m, n]`` by a Gram eigensolve of the
    smaller side: float64, or on the CPU for float32 deltas a float32 subspace refined by a
    float64 Rayleigh–Ritz step (:data:`GRAM_WORKING_PRECISION`). Returns ``(v [B, n, k],
    s [B, k])`` float64, descending."""
    if _gram_precision(d) == torch.float64:
        return _gram_right_basis_float64(d, k)
    d = d.to(torch.float32)
    m, n = d.shape[-2:]
    right = n <= m
    evals, evecs = _gram_top_eigh(d, k, right=right)
    v0 = _orthonormal(evecs if right else (d.mT @ evecs.to(d.dtype)).to(torch.float64))
    x = (d @ v0.to(d.dtype)).to(torch.float64)
    ritz, w = _desc_eigh(_sym(x.mT @ x))
    v, s = v0 @ w, ritz.clamp_min(0.0).sqrt()
    unresolved = ~((evals[:, 0] > 0) & (evals[:, k - 1] >= GRAM_WORKING_FLOOR * evals[:, 0]))
    if bool(unresolved.any()):
        idx = unresolved.nonzero().squeeze(-1)
        v_exact, s_exact = _gram_right_basis_float64(d.index_select(0, idx), k)
        v = v.index_copy(0, idx, v_exact)
        s = s.index_copy(0, idx, s_exact)
    return v, s


def _gram_right_basis_float64(d: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """:func:`_gram_right_basis` in float64 throughout."""
    d = d.to(torch.float64)
    m, n = d.shape[-2:]
    if n <= m:
        evals, evecs = _gram_top_eigh(d, k, right=True)
        return evecs, evals.clamp_min(0.0).sqrt()
    # Wide matrix: eigensolve ΔΔᵀ (m × m), map the left vectors to the right side,
    # orthonormalise and finish with a float64 Rayleigh–Ritz step (robust for tiny or
    # zero singular values, where Δᵀu/s would be ill-defined).
    _, evecs = _gram_top_eigh(d, k, right=False)
    v0 = _orthonormal(d.mT @ evecs)
    x = d @ v0
    evals, w = _desc_eigh(_sym(x.mT @ x))
    return v0 @ w, evals.clamp_min(0.0).sqrt()


def _randomized_right_basis(
    d: Tensor,
    rank: int,
    energy: float,
    sketch: int,
    max_iters: int,
    tol: float,
    seed: int,
    sq_norm: Tensor,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Randomized subspace iteration with per-element certification.

    ``d [B, m, n]`` in its working precision. Returns ``(v [B, n, sketch] float64,
    s [B, sketch] float64, certified [B] bool, iterations)``; uncertified elements must
    be redone exactly by the caller.

    Each iteration: ``X = Δ V``, Ritz pairs of ``ΔᵀΔ`` on ``span V`` from the float64
    eigendecomposition of ``XᵀX``, ``Y = Δᵀ X = (ΔᵀΔ) V``, Ritz residuals
    ``ρ_j = ‖(ΔᵀΔ) v_j − θ_j v_j‖ = ‖Y w_j − V w_j θ_j‖``, then ``V ← orth(Y)``. An element
    is certified once every needed pair (``j < min(rank, r_E)``) has
    ``ρ_j ≤ tol·θ_j + floor·θ_1`` (``floor`` = the working precision's rounding level);
    it is then frozen, so its result does not depend on the rest of the batch. The
    singular values are those Ritz values (for ``ΔᵀΔ`` eigenvalue errors are second
    order, ≲ ρ²/gap). Subspace iteration converges for pair j like
    ``(θ_sketch/θ_j)`` per step; an element predicted to need more than ``max_iters``
    steps (flat spectra) is given up early and left to the exact path.
    """
    bsz, m, n = d.shape
    cdt = d.dtype
    device = d.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Same start for every element (and on every device): batched == unbatched.
    omega = torch.randn(n, sketch, generator=gen, dtype=torch.float64)
    v0 = _orthonormal(omega).to(device=device, dtype=cdt)

    # Rounding level of the residual in the working precision (measured: ~3e-7·θ_1 in
    # float32 at stagnation, independent of the size).
    floor = 8.0 * torch.finfo(cdt).eps
    certified = torch.zeros(bsz, dtype=torch.bool, device=device)
    out_v = torch.zeros(bsz, n, sketch, dtype=torch.float64, device=device)
    out_s = torch.zeros(bsz, sketch, dtype=torch.float64, device=device)

    active = torch.arange(bsz, device=device)  # elements still iterating
    d_act = d
    v = v0.expand(bsz, n, sketch).contiguous()
    for it in range(max_iters):
        x = d_act @ v
        x64 = x.to(torch.float64)
        theta, w = _desc_eigh(_sym(x64.mT @ x64))
        theta = theta.clamp_min(0.0)
        y = d_act.mT @ x
        w_c = w.to(cdt)
        resid = y @ w_c - (v @ w_c) * theta.to(cdt).unsqueeze(-2)
        rho = torch.linalg.vector_norm(resid, dim=-2).to(torch.float64)

        sq = sq_norm.index_select(0, active)
        s = theta.sqrt()
        need = _truncation_rank(s, sq, rank, energy)
        j = torch.arange(sketch, device=device)
        needed = j < need.unsqueeze(-1)
        target = tol * theta + floor * theta[:, :1]
        ok_pairs = (rho <= target) | ~needed
        done = ok_pairs.all(-1) | (sq == 0)

        # Predict the steps still needed from the convergence rate θ_last/θ_j; give up
        # on elements that would not make it within max_iters (flat spectra).
        give_up = torch.zeros_like(done)
        if it >= 1 and sketch < min(m, n):
            rate = (theta[:, -1:] / theta.clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=1.0 - 1e-9)
            ratio = (target / rho.clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=1.0)
            steps = torch.log(ratio) / torch.log(rate)
            steps = torch.where(ok_pairs, torch.zeros_like(steps), steps)
            give_up = ~done & (it + 1 + steps.amax(-1) > max_iters)

        if done.any():
            idx = active[done]
            out_v.index_copy_(0, idx, v[done].to(torch.float64) @ w[done])
            out_s.index_copy_(0, idx, s[done])
            certified.index_fill_(0, idx, True)
        keep = ~(done | give_up)
        if it == max_iters - 1 or not keep.any():
            break
        y = y[keep] if not keep.all() else y
        v = _orthonormal(y)
        if not keep.all():
            active = active[keep]
            d_act = d.index_select(0, active)
    return out_v, out_s, certified, it + 1


def right_basis(
    delta: Delta,
    rank: int = 32,
    energy: float = 0.95,
    *,
    method: str = "auto",
    oversample: int | None = None,
    max_iters: int = 16,
    tol: float = 1e-4,
    seed: int = 0,
) -> RightBasis:
    """Energy-truncated right singular basis ``V_Δ, S_Δ`` of a delta (METHOD §1).

    Keeps ``r = min(rank, r_E)`` pairs, ``r_E`` the smallest r with
    ``Σ_{i≤r} s_i² ≥ energy · ‖Δ‖_F²`` (the total energy is ``‖Δ‖_F²``, so only the top
    pairs are needed). A zero delta has rank 0. See :class:`RightBasis` for the padding.

    Solvers (all match a dense SVD; the choice only affects speed):

    - :class:`LowRankDelta`: QR of both factors and an SVD of the ``r × r`` core, exact,
      never forming ``B A``.
    - ``method="gram"``: float64 eigendecomposition of the Gram matrix of the smaller
      side — exact, but ``O(min(d)^3)`` and its cost does not depend on ``rank``. On the
      CPU a float32 delta's subspace is found in float32 and its pairs by a float64
      Rayleigh–Ritz step (see :data:`GRAM_WORKING_PRECISION`).
    - ``method="randomized"``: randomized subspace iteration with ``rank + oversample``
      columns (default oversample = rank) in the delta's working precision (float32 for
      float32/bf16 inputs, float64 for float64), Ritz values from a float64
      eigendecomposition, stopped per element by a residual certificate
      (``‖ΔᵀΔv_j − s_j²v_j‖ ≤ tol·s_j²`` for every kept pair). Elements that do not
      certify within ``max_iters`` (flat spectra, where the top singular values are
      nearly degenerate and subspace iteration stalls) are recomputed exactly by the
      Gram path, so the answer never silently degrades.
    - ``method="auto"`` (default): the Gram path when the smaller side is at most
      ``max(256, 4·(rank + oversample))`` (cheap there and exact), on the CPU also up to
      :data:`GRAM_AUTO_MAX_SIDE_CPU` (768: there a fine-tuning update's slowly decaying
      spectrum makes the randomized solver costlier than the exact eigensolve), else
      randomized.

    Why this choice: on a 3072×1024 tensor, ``torch.linalg.svd`` costs ~0.4 s (float32)
    and ~4 s (float64) on a 2-core CPU, and the float64 Gram eigensolve ~0.3 s; for the
    low-rank-plus-noise spectra of fine-tuning updates, the certified subspace
    iteration converges in a few iterations, each two thin ``d_out×d_in×(2·rank)``
    products (~0.02 s), and it needs no large eigendecomposition (slow on GPUs). The
    Gram fallback keeps flat spectra exact at Gram cost.

    Args:
        delta: ``[..., d_out, d_in]`` tensor or :class:`LowRankDelta`.
        rank: cap on the number of kept pairs (analysis 32, merging 16).
        energy: energy fraction in ``(0, 1]`` (analysis 0.95, merging 0.9).
        method: ``"auto"``, ``"randomized"`` or ``"gram"`` (dense deltas only).
        oversample: extra sketch columns for the randomized path (default ``rank``).
        max_iters: iteration cap of the randomized path before the exact fallback.
        tol: relative Ritz residual that certifies a pair.
        seed: seed of the (CPU-generated, device-independent) random start.
    """
    _check_delta(delta)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not (0.0 < energy <= 1.0):
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if method not in ("auto", "randomized", "gram"):
        raise ValueError(f"method must be 'auto', 'randomized' or 'gram', got {method!r}")
    if isinstance(delta, LowRankDelta):
        return _lowrank_right_basis(delta, rank, energy)

    batch_shape = delta.shape[:-2]
    m, n = delta.shape[-2:]
    d = delta.reshape(-1, m, n)
    bsz = d.shape[0]
    small = min(m, n)
    k = min(rank, small)
    d_c = d.to(compute_dtype_for(d.dtype))
    # ‖Δ‖_F² accumulated in the working precision (~1e-7 relative in float32, plenty for
    # the energy threshold; an upcast of the whole tensor would cost more than a pass).
    sq_norm = torch.linalg.vector_norm(d_c, dim=(-2, -1)).to(torch.float64).square()
    if bsz == 0 or small == 0:
        v = torch.zeros(bsz, n, 0, dtype=torch.float64, device=d.device)
        s = torch.zeros(bsz, 0, dtype=torch.float64, device=d.device)
        return _package(v, s, sq_norm, rank, energy, batch_shape)

    sketch = min(rank + (rank if oversample is None else oversample), small)
    if method == "auto":
        method = "gram" if takes_gram_path(d.shape, d.device, rank, oversample) else "randomized"

    if method == "gram":
        v, s = _gram_right_basis(d, k)
        return _package(v, s, sq_norm, rank, energy, batch_shape)

    v, s, certified, _ = _randomized_right_basis(d_c, rank, energy, sketch, max_iters, tol, seed, sq_norm)
    v, s = v[..., :k], s[..., :k]
    if not bool(certified.all()):
        idx = (~certified).nonzero().squeeze(-1)
        v_exact, s_exact = _gram_right_basis(d.index_select(0, idx), k)
        v = v.index_copy(0, idx, v_exact)
        s = s.index_copy(0, idx, s_exact)
    return _package(v, s, sq_norm, rank, energy, batch_shape)


# ------------------------------------------------------------ union basis, covariances


def union_basis(bases: list[RightBasis]) -> tuple[Tensor, Tensor]:
    """Union basis ``Q = orth([V_1 … V_n])`` (METHOD §1, "Union basis").

    Householder QR of the concatenated bases, dropping columns with
    ``|R_ii| ≤ 1e-8``. Returns ``(Q [..., d_in, k_max] float64, k [...] long)``: the
    first ``k`` columns of each element are orthonormal, the rest exactly zero.

    Padding is made exact by moving each element's valid columns (in their original
    order) in front of the zero padding before the QR: Householder QR is column
    sequential and a zero column gets the identity reflector, so the leading ``Q``
    columns and ``R_ii`` equal those of the unpadded matrix.
    """
    if not bases:
        raise ValueError("union_basis needs at least one basis")
    mats = [b.basis.to(torch.float64) for b in bases]
    valid = [torch.arange(b.basis.shape[-1], device=b.basis.device) < b.ranks.unsqueeze(-1) for b in bases]
    cat = torch.cat(mats, dim=-1)
    valid_cat = torch.cat(valid, dim=-1)
    batch_shape = cat.shape[:-2]
    d_in, total = cat.shape[-2:]
    if total == 0 or cat.numel() == 0:
        q = cat.new_zeros(*batch_shape, d_in, 0)
        return q, torch.zeros(batch_shape, dtype=torch.long, device=cat.device)
    cat = cat.reshape(-1, d_in, total)
    valid_cat = valid_cat.reshape(-1, total)
    bsz = cat.shape[0]

    order = torch.argsort((~valid_cat).to(torch.int8), dim=-1, stable=True)
    cat = torch.gather(cat, -1, order.unsqueeze(-2).expand(bsz, d_in, total))
    n_valid = valid_cat.sum(-1)
    cat = cat * (torch.arange(total, device=cat.device) < n_valid.unsqueeze(-1)).unsqueeze(-2)

    with small_linalg(cat.device):
        q, r = torch.linalg.qr(cat)  # reduced: q [B, d_in, min(d_in, total)]
    width = q.shape[-1]
    diag = r.diagonal(dim1=-2, dim2=-1).abs()
    keep = (diag > UNION_DROP_TOL) & (torch.arange(width, device=q.device) < n_valid.unsqueeze(-1))
    k = keep.sum(-1)
    order2 = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    q = torch.gather(q, -1, order2.unsqueeze(-2).expand(bsz, d_in, width))
    k_max = int(k.max().item())
    q = q[..., :k_max] * (torch.arange(k_max, device=q.device) < k.unsqueeze(-1)).unsqueeze(-2)
    return q.reshape(*batch_shape, d_in, k_max), k.reshape(batch_shape)


def projected_covariance(q: Tensor, k: Tensor, basis: RightBasis, eps: float) -> Tensor:
    """Projected covariance ``B = (QᵀV) S² (QᵀV)ᵀ + ε I`` (METHOD §1).

    ``q [..., d_in, k_max]`` and ``k [...]`` from :func:`union_basis`. Returns
    ``[..., k_max, k_max]`` float64; the ridge ``ε I`` is added on the ``k`` valid dims
    only, so padded rows/columns are exactly zero and traces are exact.
    """
    q = q.to(torch.float64)
    p = q.mT @ basis.basis.to(torch.float64)
    cov = (p * basis.singular_values.to(torch.float64).square().unsqueeze(-2)) @ p.mT
    cov = _sym(cov)
    k_max = q.shape[-1]
    mask = (torch.arange(k_max, device=q.device) < k.unsqueeze(-1)).to(torch.float64)
    return cov + eps * torch.diag_embed(mask)
