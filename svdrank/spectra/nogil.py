"""The three BLAS/LAPACK calls of the hot path, made without holding Python's GIL.

SciPy's ``scipy.linalg.blas``/``lapack`` wrappers hold the GIL for the whole
call, so while a layer's Gram matrix is formed (SYRK, ~0.13 s) or its
eigenvalues computed (syevr, ~0.2 s) the thread that reads and forms the next
layer cannot run a line. The same routines are published by SciPy, for
Cython, as function pointers in ``scipy.linalg.cython_blas`` and
``cython_lapack`` (``__pyx_capi__``); a ``ctypes`` call through such a pointer
releases the GIL. Numba reaches LAPACK the same way. These are the routines
of SciPy's own OpenBLAS, so nothing else is loaded and results are those of
the SciPy wrappers, which tests check.

Each pointer is used only if its capsule's C signature is exactly the one
these calls are written for; if a SciPy lacks a routine or changes its
signature, the function falls back to the SciPy wrapper: slower to overlap,
same numbers.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable

import numpy as np
import scipy.linalg
from scipy.linalg import cython_blas, cython_lapack

_INT = ctypes.c_int
_CHAR = ctypes.c_char_p
_POINTER = ctypes.c_void_p
_SCALAR = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}
_PREFIX = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}


def _capsule_api():
    """Set up ctypes views of PyCapsule_GetName and PyCapsule_GetPointer."""
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return api


def _signature(capsule_name: bytes) -> str:
    """Return a capsule's C signature with Cython's scalar aliases shortened to s and d."""
    return re.sub(r"__pyx_t_\w+?cython_(?:blas|lapack)_([sd])\b", r"\1", capsule_name.decode())


def _routine(module, name: str, signature: str, restype=None) -> Callable | None:
    """Wrap an exported routine as a ctypes function, if its C signature is the expected one.

    ``signature`` uses ``X`` for the routine's own scalar type (s or d). Any
    other signature (a future SciPy) gives None, and the caller falls back.
    """
    capsule = getattr(module, "__pyx_capi__", {}).get(name)
    if capsule is None:
        return None
    api = _capsule_api()
    capsule_name = api.PyCapsule_GetName(capsule)
    if _signature(capsule_name) != signature.replace("X", name[0]):
        return None
    address = api.PyCapsule_GetPointer(capsule, capsule_name)
    arguments = signature.count("*")
    return ctypes.CFUNCTYPE(restype, *([_POINTER] * arguments))(address)


_SYRK_SIGNATURE = "void (char *, char *, int *, int *, X *, X *, int *, X *, X *, int *)"
_SYEVR_SIGNATURE = (
    "void (char *, char *, char *, int *, X *, int *, X *, X *, int *, int *, X *, int *, "
    "X *, X *, int *, int *, X *, int *, int *, int *, int *)"
)
_SYTRD_SIGNATURE = "void (char *, int *, X *, int *, X *, X *, X *, X *, int *, int *)"
_STEVD_SIGNATURE = "void (char *, int *, X *, X *, X *, int *, X *, int *, int *, int *, int *)"
_ORMQR_SIGNATURE = (
    "void (char *, char *, int *, int *, int *, X *, int *, X *, X *, int *, X *, int *, int *)"
)
_SYRK = {d: _routine(cython_blas, f"{p}syrk", _SYRK_SIGNATURE) for d, p in _PREFIX.items()}
_SYEVR = {d: _routine(cython_lapack, f"{p}syevr", _SYEVR_SIGNATURE) for d, p in _PREFIX.items()}
_SYTRD = {d: _routine(cython_lapack, f"{p}sytrd", _SYTRD_SIGNATURE) for d, p in _PREFIX.items()}
_STEVD = {d: _routine(cython_lapack, f"{p}stevd", _STEVD_SIGNATURE) for d, p in _PREFIX.items()}
_ORMQR = {d: _routine(cython_lapack, f"{p}ormqr", _ORMQR_SIGNATURE) for d, p in _PREFIX.items()}
_DSDOT = _routine(cython_blas, "dsdot", "X (int *, s *, int *, s *, int *)", ctypes.c_double)


def _ref(value, ctype) -> ctypes.c_void_p:
    """Point to a fresh C scalar (Fortran passes every argument by reference)."""
    return ctypes.cast(ctypes.pointer(ctype(value)), ctypes.c_void_p)


def _data(array: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(array.ctypes.data)


def _info() -> tuple[ctypes.c_int, ctypes.c_void_p]:
    """Return a LAPACK info flag and the pointer to hand the routine."""
    info = ctypes.c_int(0)
    return info, ctypes.cast(ctypes.pointer(info), ctypes.c_void_p)


def _check(info: ctypes.c_int, routine: str) -> None:
    """Raise numpy's LinAlgError if a LAPACK routine reported a failure."""
    if info.value != 0:
        raise np.linalg.LinAlgError(f"{routine} failed (info={info.value})")


def gram_lower(delta: np.ndarray) -> np.ndarray:
    """Form the lower triangle of ΔWᵀΔW or ΔWΔWᵀ, whichever is smaller (SYRK, GIL released).

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64

    Returns
    -------
    ndarray, shape (min(m, n), min(m, n))
        Fortran-ordered; its strict upper triangle is zero.
    """
    m, n = delta.shape
    wants_columns = m >= n  # ΔWᵀΔW is the smaller one
    if not delta.flags.f_contiguous:
        # A C-ordered ΔW's transpose is Fortran-ordered: SYRK reads it in place.
        delta = np.ascontiguousarray(delta).T
        wants_columns = not wants_columns
    syrk = _SYRK.get(delta.dtype)
    if syrk is None:
        wrapper = scipy.linalg.blas.get_blas_funcs("syrk", (delta,))
        return wrapper(1.0, delta, trans=1 if wants_columns else 0, lower=1)
    rows, columns = delta.shape
    size, depth = (columns, rows) if wants_columns else (rows, columns)
    gram = np.zeros((size, size), dtype=delta.dtype, order="F")
    scalar = _SCALAR[delta.dtype]
    syrk(
        _CHAR(b"L"),
        _CHAR(b"T" if wants_columns else b"N"),
        _ref(size, _INT),
        _ref(depth, _INT),
        _ref(1.0, scalar),
        _data(delta),
        _ref(max(rows, 1), _INT),
        _ref(0.0, scalar),
        _data(gram),
        _ref(max(size, 1), _INT),
    )
    return gram


def eigenvalues_lower(gram: np.ndarray) -> np.ndarray:
    """All eigenvalues, ascending, of a symmetric matrix given by its lower triangle.

    LAPACK syevr, values only, GIL released; ``gram`` is overwritten. Raises
    ``numpy.linalg.LinAlgError`` if the solver reports a failure.
    """
    syevr = _SYEVR.get(gram.dtype)
    if syevr is None or not gram.flags.f_contiguous:
        return scipy.linalg.eigh(
            gram, eigvals_only=True, lower=True, driver="evr", check_finite=False, overwrite_a=True
        )
    n = gram.shape[0]
    scalar = _SCALAR[gram.dtype]
    values = np.empty(n, dtype=gram.dtype)
    dummy = np.empty(1, dtype=gram.dtype)
    support = np.empty(max(2 * n, 1), dtype=np.int32)
    work_size, iwork_size = np.empty(1, dtype=gram.dtype), np.empty(1, dtype=np.int32)
    found, info = ctypes.c_int(0), ctypes.c_int(0)

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        syevr(
            _CHAR(b"N"),
            _CHAR(b"A"),
            _CHAR(b"L"),
            _ref(n, _INT),
            _data(gram),
            _ref(max(n, 1), _INT),
            _ref(0.0, scalar),
            _ref(0.0, scalar),
            _ref(1, _INT),
            _ref(n, _INT),
            _ref(0.0, scalar),
            ctypes.cast(ctypes.pointer(found), ctypes.c_void_p),
            _data(values),
            _data(dummy),
            _ref(1, _INT),
            _data(support),
            _data(work),
            _ref(lwork, _INT),
            _data(iwork),
            _ref(liwork, _INT),
            ctypes.cast(ctypes.pointer(info), ctypes.c_void_p),
        )

    call(work_size, -1, iwork_size, -1)  # workspace query
    lwork, liwork = int(work_size[0]), int(iwork_size[0])
    call(np.empty(lwork, dtype=gram.dtype), lwork, np.empty(liwork, dtype=np.int32), liwork)
    if info.value != 0:
        raise np.linalg.LinAlgError(f"syevr failed (info={info.value})")
    return values[: found.value]


def sum_of_squares_f32(values: np.ndarray) -> float | None:
    """Σ x² of a contiguous float32 array, accumulated in float64 (BLAS dsdot, GIL released).

    Returns None when dsdot is not available, so that the caller uses its own sum.
    """
    flat = values.reshape(-1)
    if _DSDOT is None or not flat.flags.c_contiguous:
        return None
    one = _ref(1, _INT)
    return float(_DSDOT(_ref(flat.size, _INT), _data(flat), one, _data(flat), one))


def reduce_lower(
    gram: np.ndarray, lwork: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Householder tridiagonal reduction of the lower triangle (LAPACK sytrd, GIL released).

    ``lwork`` is the workspace handed to sytrd, which sets its blocking (so
    its numbers). Returns the reflectors (``gram`` itself, overwritten, when
    it is Fortran-ordered), T's diagonal and subdiagonal, and the reflectors'
    τ. Raises ``numpy.linalg.LinAlgError`` on failure.
    """
    sytrd = _SYTRD.get(gram.dtype)
    if sytrd is None or not gram.flags.f_contiguous:
        wrapper = scipy.linalg.lapack.get_lapack_funcs("sytrd", (gram,))
        reflectors, diagonal, off_diagonal, scales, status = wrapper(
            gram, lower=1, lwork=lwork, overwrite_a=1
        )
        _check(ctypes.c_int(status), "sytrd")
        return reflectors, diagonal, off_diagonal, scales
    n = gram.shape[0]
    diagonal = np.empty(n, dtype=gram.dtype)
    off_diagonal = np.empty(max(n - 1, 0), dtype=gram.dtype)
    scales = np.empty(max(n - 1, 0), dtype=gram.dtype)
    work = np.empty(lwork, dtype=gram.dtype)
    info, status = _info()
    sytrd(
        _CHAR(b"L"),
        _ref(n, _INT),
        _data(gram),
        _ref(max(n, 1), _INT),
        _data(diagonal),
        _data(off_diagonal),
        _data(scales),
        _data(work),
        _ref(lwork, _INT),
        status,
    )
    _check(info, "sytrd")
    return gram, diagonal, off_diagonal, scales


def tridiagonal_eigh(
    diagonal: np.ndarray, off_diagonal: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every eigenvalue (ascending) and eigenvector of a symmetric tridiagonal matrix.

    LAPACK stevd (divide and conquer), GIL released; the inputs are kept.
    Returns the values and the vectors (n × n, Fortran order). Raises
    ``numpy.linalg.LinAlgError`` on failure.
    """
    stevd = _STEVD.get(diagonal.dtype)
    if stevd is None:
        wrapper = scipy.linalg.lapack.get_lapack_funcs("stevd", (diagonal,))
        values, vectors, status = wrapper(diagonal, off_diagonal)
        _check(ctypes.c_int(status), "stevd")
        return values, vectors
    n = diagonal.size
    values, off = diagonal.copy(), np.append(off_diagonal, diagonal.dtype.type(0))
    vectors = np.empty((n, n), dtype=diagonal.dtype, order="F")
    lwork, liwork = 1 + 4 * n + n * n, 3 + 5 * n  # stevd's least workspace with vectors
    work, iwork = np.empty(lwork, dtype=diagonal.dtype), np.empty(liwork, dtype=np.int32)
    info, status = _info()
    stevd(
        _CHAR(b"V"),
        _ref(n, _INT),
        _data(values),
        _data(off),
        _data(vectors),
        _ref(max(n, 1), _INT),
        _data(work),
        _ref(lwork, _INT),
        _data(iwork),
        _ref(liwork, _INT),
        status,
    )
    _check(info, "stevd")
    return values, vectors


def apply_reflectors(
    reflectors: np.ndarray, scales: np.ndarray, block: np.ndarray, block_size: int
) -> np.ndarray:
    """Q·C for Q = H₁·…·H_k given as a QR's reflectors (LAPACK ormqr, GIL released).

    ``reflectors`` (m × k) and ``block`` (C, m × c) may be views into larger
    Fortran-ordered arrays (column stride = leading dimension); ``block`` is
    overwritten and returned. ``block_size`` sets the workspace,
    c·block_size + (block_size + 1)·block_size. Raises
    ``numpy.linalg.LinAlgError`` on failure.
    """
    ormqr = _ORMQR.get(block.dtype)
    if ormqr is None or not (_fortran_view(reflectors) and _fortran_view(block)):
        wrapper = scipy.linalg.lapack.get_lapack_funcs("ormqr", (block,))
        lwork = (block.shape[1] + block_size + 1) * block_size
        product, _, status = wrapper("L", "N", reflectors, scales, block, lwork, overwrite_c=1)
        _check(ctypes.c_int(status), "ormqr")
        block[...] = product
        return block
    rows, columns = block.shape
    lwork = (columns + block_size + 1) * block_size
    work = np.empty(lwork, dtype=block.dtype)
    info, status = _info()
    ormqr(
        _CHAR(b"L"),
        _CHAR(b"N"),
        _ref(rows, _INT),
        _ref(columns, _INT),
        _ref(scales.size, _INT),
        _data(reflectors),
        _ref(_leading(reflectors), _INT),
        _data(scales),
        _data(block),
        _ref(_leading(block), _INT),
        _data(work),
        _ref(lwork, _INT),
        status,
    )
    _check(info, "ormqr")
    return block


def _fortran_view(array: np.ndarray) -> bool:
    """Whether a 2-D array is Fortran-ordered up to its column stride (a leading dimension)."""
    return array.ndim == 2 and array.strides[0] == array.itemsize and array.strides[1] > 0


def _leading(array: np.ndarray) -> int:
    """Return the leading dimension of a Fortran-ordered (view of an) array."""
    return max(array.strides[1] // array.itemsize, array.shape[0], 1)
