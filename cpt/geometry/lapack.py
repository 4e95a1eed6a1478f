"""The Gram eigensolve of one matrix through BLAS/LAPACK with the GIL released.

:func:`gram_top_pairs` is what :func:`cpt.geometry.bases._gram_top_eigh` runs per matrix on the
CPU: the Gram product (``?syrk``, upper triangle) and its top-``k`` eigenpairs (``?syevr``,
``RANGE='I'``), the same two LAPACK/BLAS calls ``scipy.linalg.blas.?syrk`` and
``scipy.linalg.eigh(subset_by_index=…, driver="evr")`` make. Why not those: scipy's f2py
wrappers hold the GIL for the whole call, so the eigensolve pool's threads ran one after
another — measured on 29 SmolLM2-sized 1536×576 float32 matrices on an idle 2-core machine,
two threads took 0.644 s against 0.604 s serially. scipy also exports the same routines as
Cython ``nogil`` functions (:mod:`scipy.linalg.cython_blas`, :mod:`scipy.linalg.cython_lapack`);
called through :mod:`ctypes` (a ``CFUNCTYPE`` call releases the GIL) they run side by side.
This is how numba reaches LAPACK too (``numba.extending.get_cython_function_address``).

Same library, same arguments, same workspace sizes: the results equal scipy's bit for bit
(``tests/geometry/test_geometry_speedups.py``). :func:`available` is False when a scipy build
does not export the capsules; callers then keep scipy's wrappers.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import numpy

_INT = ctypes.c_int
_PTR = ctypes.c_void_p
_CHAR = ctypes.c_char_p


def _capsule_address(module, name: str) -> int:
    capsule = module.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return get_pointer(capsule, get_name(capsule))


# Fortran calling convention: every argument by reference. ?syrk(uplo, trans, n, k, alpha, a, lda, beta, c, ldc)
_SYRK = ctypes.CFUNCTYPE(None, _CHAR, _CHAR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR)
# ?syevr(jobz, range, uplo, n, a, lda, vl, vu, il, iu, abstol, m, w, z, ldz, isuppz, work, lwork, iwork, liwork, info)
_SYEVR = ctypes.CFUNCTYPE(
    None, _CHAR, _CHAR, _CHAR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR,
    _PTR, _PTR, _PTR, _PTR,
)  # fmt: skip


@functools.cache
def _routines(prefix: str):
    import scipy.linalg.cython_blas as cython_blas
    import scipy.linalg.cython_lapack as cython_lapack

    return (
        _SYRK(_capsule_address(cython_blas, f"{prefix}syrk")),
        _SYEVR(_capsule_address(cython_lapack, f"{prefix}syevr")),
    )


@functools.cache
def available() -> bool:
    """Whether this scipy exports the nogil ``?syrk``/``?syevr`` this module calls."""
    try:
        _routines("s"), _routines("d")
    except Exception:  # noqa: BLE001 - any scipy without the capsules: fall back to its wrappers
        return False
    return True


def _ref(value, ctype):
    return ctypes.byref(ctype(value))


_workspace_lock = threading.Lock()
_workspace_sizes: dict[tuple[str, int, int], tuple[int, int]] = {}


def _syevr(prefix: str, gram, size: int, k: int, values, vectors, isuppz, work, lwork: int, iwork, liwork: int):
    """``?syevr`` for the top ``k`` eigenpairs of the upper triangle of ``gram [size, size]`` (Fortran
    order, overwritten); ``lwork = liwork = -1`` is LAPACK's workspace query. Returns ``(found, info)``."""
    real = ctypes.c_float if prefix == "s" else ctypes.c_double
    found, info = _INT(0), _INT(0)
    _routines(prefix)[1](
        b"V", b"I", b"U", _ref(size, _INT), gram.ctypes.data, _ref(size, _INT), _ref(0.0, real), _ref(0.0, real),
        _ref(size - k + 1, _INT), _ref(size, _INT), _ref(0.0, real), ctypes.byref(found), values.ctypes.data,
        vectors.ctypes.data, _ref(size, _INT), isuppz.ctypes.data, work.ctypes.data, _ref(lwork, _INT),
        iwork.ctypes.data, _ref(liwork, _INT), ctypes.byref(info),
    )  # fmt: skip
    return found.value, info.value


def _arrays(dtype, size: int, k: int, lwork: int, liwork: int):
    """``?syevr``'s output and workspace arrays: values, vectors (Fortran), isuppz, work, iwork."""
    return (
        numpy.empty(size, dtype=dtype),
        numpy.empty((size, k), dtype=dtype, order="F"),
        numpy.empty(2 * k, dtype=numpy.intc),
        numpy.empty(max(1, lwork), dtype=dtype),
        numpy.empty(max(1, liwork), dtype=numpy.intc),
    )


def _syevr_workspace(prefix: str, size: int, k: int) -> tuple[int, int]:
    """``(lwork, liwork)`` from LAPACK's own workspace query (``lwork = liwork = -1``), as scipy's
    ``?syevr_lwork`` asks it; cached per (precision, size, k)."""
    key = (prefix, size, k)
    with _workspace_lock:
        if key in _workspace_sizes:
            return _workspace_sizes[key]
    dtype = numpy.float32 if prefix == "s" else numpy.float64
    values, vectors, isuppz, work, iwork = _arrays(dtype, size, k, 1, 1)
    _syevr(
        prefix, numpy.zeros((size, size), dtype=dtype, order="F"), size, k, values, vectors, isuppz, work, -1, iwork, -1
    )
    # as scipy's _compute_lwork: a float32 size is taken at the next representable value (LAPACK may
    # have rounded it down when storing it in a float32)
    optimal = numpy.nextafter(work[0], numpy.inf, dtype=numpy.float32) if prefix == "s" else work[0]
    sizes = (int(optimal), int(iwork[0]))
    with _workspace_lock:
        _workspace_sizes[key] = sizes
    return sizes


def gram_top_pairs(matrix: numpy.ndarray, k: int, right: bool) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Top-``k`` eigenpairs of ``matrixᵀ matrix`` (``right``) or ``matrix matrixᵀ``, descending, as float64.

    ``matrix [m, n]``: C-ordered float32 or float64; the Gram product and the eigensolve run in
    its precision (the upper triangle only), with the GIL released. Returns ``(values [k],
    vectors [size, k])``. Needs ``0 < k < size``.
    """
    prefix = {numpy.dtype(numpy.float32): "s", numpy.dtype(numpy.float64): "d"}[matrix.dtype]
    real = ctypes.c_float if prefix == "s" else ctypes.c_double
    syrk = _routines(prefix)[0]
    matrix = numpy.ascontiguousarray(matrix)
    rows, cols = matrix.shape
    # A C-ordered [m, n] array is the Fortran [n, m] array X = matrixᵀ (leading dimension n):
    # matrixᵀ matrix = X Xᵀ (trans 'N', inner dimension m); matrix matrixᵀ = Xᵀ X (trans 'T').
    size, inner = (cols, rows) if right else (rows, cols)
    gram = numpy.empty((size, size), dtype=matrix.dtype, order="F")
    syrk(
        b"U", b"N" if right else b"T", _ref(size, _INT), _ref(inner, _INT), _ref(1.0, real), matrix.ctypes.data,
        _ref(cols, _INT), _ref(0.0, real), gram.ctypes.data, _ref(size, _INT),
    )  # fmt: skip
    lwork, liwork = _syevr_workspace(prefix, size, k)
    values, vectors, isuppz, work, iwork = _arrays(matrix.dtype, size, k, lwork, liwork)
    found, info = _syevr(prefix, gram, size, k, values, vectors, isuppz, work, lwork, iwork, liwork)
    if info != 0 or found != k:
        raise ArithmeticError(f"?syevr failed (info {info}, {found} of {k} eigenpairs)")
    # ?syevr: ascending
    return values[:k][::-1].astype(numpy.float64), vectors[:, ::-1].astype(numpy.float64)
