"""Singular values of a layer's update ΔW: exact, Gram, randomized, Lanczos and auto.

Every engine returns singular values only: rank analysis never needs the
vectors, and skipping them is several times faster. Every result carries the
total energy ‖ΔW‖_F² (a float64 sum of squares, within 2⁻²⁴ relative, no SVD
needed), so the energy fraction E(k) = Σ_{i≤k} σᵢ² / ‖ΔW‖_F² is as exact as the
values computed.

Truncated engines (randomized, Lanczos) return values that never exceed the
true ones (they are singular values of a projection of ΔW; Cauchy interlacing),
so E(k) from them is a lower bound and a rank read from them is never below the
exact rank. ``svdrank.spectra.engines`` grows their k until the values are enough.

float32 input stays float32 through the heavy work; float64 input stays float64.
Sums that decide a rank accumulate in float64.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from svdrank.errors import NumericalError
from svdrank.spectra import nogil

CHUNK_ELEMENTS = 1 << 20


def sum_of_squares(array: np.ndarray) -> float:
    """Σ x² over every entry, accumulated in float64, a bounded chunk at a time.

    float32 chunks go to BLAS dsdot (sum in float64, GIL released, ~1 ms per
    10 M entries here against ~12 ms for einsum; OpenBLAS may round each
    product to float32, so the sum is within 2⁻²⁴ relative of the exact one);
    narrower floats (BF16, F16, F8) are widened to float32 first, which is
    exact; float64 is summed by einsum. No chunk is ever copied whole to
    float64 (8 bytes per entry).
    """
    flat = np.ravel(array)
    total = 0.0
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        chunk = flat[start : start + CHUNK_ELEMENTS]
        if chunk.dtype != np.float64 and chunk.dtype != np.float32:
            chunk = chunk.astype(np.float32)
        fast = nogil.sum_of_squares_f32(chunk) if chunk.dtype == np.float32 else None
        total += fast if fast is not None else np.einsum("i,i->", chunk, chunk, dtype=np.float64)
    return float(total)


def column_sums_of_squares(matrix: np.ndarray) -> np.ndarray:
    """Σ over rows of x² for each column, in float64, CHUNK_ELEMENTS entries of rows at a time.

    Each square is rounded to the matrix's dtype (float32: within 2⁻²⁴
    relative, as dsdot may) and summed in float64.
    """
    sums = np.zeros(matrix.shape[1])
    rows = max(1, CHUNK_ELEMENTS // max(matrix.shape[1], 1))
    for start in range(0, matrix.shape[0], rows):
        sums += np.square(matrix[start : start + rows]).sum(axis=0, dtype=np.float64)
    return sums


def total_energy(delta: np.ndarray) -> float:
    """‖ΔW‖_F², accumulated in float64 so that it can decide a rank."""
    return sum_of_squares(delta)


def check_finite(delta: np.ndarray, name: str) -> float:
    """Return ‖ΔW‖_F² after checking that every entry is finite.

    Raises
    ------
    NumericalError
        If ΔW holds NaN or Inf (the sum of squares is then not finite).
    """
    return require_finite(total_energy(delta), name)


def require_finite(energy: float, name: str) -> float:
    """Return ``energy`` (a sum of squares of ΔW) if it is finite.

    Raises
    ------
    NumericalError
        Otherwise: NaN or Inf in ΔW make its sum of squares NaN or Inf.
    """
    if not math.isfinite(energy):
        raise NumericalError(
            f"layer {name}: the update holds NaN or Inf values; check both checkpoints"
        )
    return energy


def exact_values(delta: np.ndarray) -> np.ndarray:
    """All singular values by LAPACK divide and conquer (gesdd), values only.

    Falls back to gesvd when gesdd does not converge. Cost O(m·n·min(m, n)).
    Accuracy: backward stable, absolute error O(ε·σ₁) on every value.

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64, finite

    Returns
    -------
    ndarray, shape (min(m, n),), same dtype as ``delta``, descending
    """
    try:
        return scipy.linalg.svd(delta, compute_uv=False, check_finite=False)
    except np.linalg.LinAlgError:
        return scipy.linalg.svd(delta, compute_uv=False, check_finite=False, lapack_driver="gesvd")


def gram_values(delta: np.ndarray) -> np.ndarray:
    """All singular values from the eigenvalues of the smaller Gram matrix.

    G = ΔWᵀΔW (or ΔWΔWᵀ when that is smaller) is formed by one SYRK (half the
    flops of a general product), then a symmetric values-only eigensolver
    (LAPACK syevr) gives λᵢ = σᵢ². Cost m·n² + O(n³) with n = min(m, n); about
    3.5x faster than gesdd on a 4096² float32 matrix here.

    Accuracy: the absolute error on each σᵢ² is of order ε·σ₁² (forming G and
    the eigensolver are both backward stable in that sense). That is harmless
    for energy fractions, whose error is at most a few ε summed over the values
    kept (measured < 3e-7 on 2048² float32 with flat, power-law and low-rank
    spectra), but values below √ε·σ₁ carry no relative accuracy: use
    :func:`exact_values` when tiny singular values themselves matter.

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64, finite

    Returns
    -------
    ndarray, shape (min(m, n),), same dtype as ``delta``, descending, ≥ 0

    References
    ----------
    Golub & Van Loan, Matrix Computations, 4th ed., §8.6 (the normal equations'
    eigenvalues) and §8.1 (Weyl's bound for symmetric perturbations).
    """
    return gram_spectrum(smaller_gram(delta))


def gram_spectrum(gram: np.ndarray) -> np.ndarray:
    """σᵢ = √λᵢ from a Gram matrix (its lower triangle is read; overwritten), descending.

    LAPACK syevr, values only, with the GIL released (see :mod:`svdrank.spectra.nogil`).
    """
    return gram_singular_values(nogil.eigenvalues_lower(gram))


def gram_singular_values(eigenvalues: np.ndarray) -> np.ndarray:
    """σᵢ = √λᵢ, descending, from a Gram matrix's ascending eigenvalues (rounding below 0 is 0)."""
    return np.sqrt(np.clip(eigenvalues[::-1], 0.0, None))


def smaller_gram(delta: np.ndarray) -> np.ndarray:
    """Form the lower triangle of ΔWᵀΔW or ΔWΔWᵀ, whichever is smaller, by one SYRK.

    ΔW is not copied and the GIL is released.

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64

    Returns
    -------
    ndarray, shape (min(m, n), min(m, n))
        Fortran-ordered, strict upper triangle zero; pass ``symmetric=True``
        to :func:`times` to multiply by the whole matrix.
    """
    return nogil.gram_lower(delta)


def times(
    a: np.ndarray, b: np.ndarray, transpose: bool = False, symmetric: bool = False
) -> np.ndarray:
    """a·b, or aᵀ·b with ``transpose``, through SciPy's BLAS, reading ``a`` in place.

    With ``symmetric``, ``a`` is a symmetric matrix of which only the lower
    triangle is read (SYMM), as :func:`smaller_gram` leaves it. Every product
    of the engines goes through this one BLAS library: NumPy and SciPy each
    bundle their own OpenBLAS, and a SciPy call right after a NumPy product
    waits for NumPy's idle threads to stop spinning (stalls of up to ~50 ms
    were measured here on 2048×42 LU factorisations).
    """
    if symmetric:
        symm = scipy.linalg.blas.get_blas_funcs("symm", (a, b))
        if a.flags.f_contiguous:
            return symm(1.0, a, b, lower=1)
        return symm(1.0, a.T, b, lower=0)  # the lower triangle of a is the upper of aᵀ
    gemm = scipy.linalg.blas.get_blas_funcs("gemm", (a, b))
    if a.flags.f_contiguous:
        return gemm(1.0, a, b, trans_a=int(transpose))
    return gemm(1.0, a.T, b, trans_a=int(not transpose))


def times_vector(a: np.ndarray, x: np.ndarray, transpose: bool = False) -> np.ndarray:
    """a·x, or aᵀ·x with ``transpose``, through SciPy's BLAS (gemv), reading ``a`` in place.

    For the same reason as :func:`times`: a NumPy product would wake NumPy's
    own OpenBLAS threads, which then spin against SciPy's.
    """
    gemv = scipy.linalg.blas.get_blas_funcs("gemv", (a, x))
    if a.flags.f_contiguous:
        return gemv(1.0, a, x, trans=int(transpose))
    return gemv(1.0, a.T, x, trans=int(not transpose))


def _normalize(block: np.ndarray, normalizer: str) -> np.ndarray:
    """Keep a sketch block well conditioned between power iterations (same span)."""
    if normalizer == "lu":
        return scipy.linalg.lu(block, permute_l=True, check_finite=False)[0]
    if normalizer == "qr":
        return scipy.linalg.qr(block, mode="economic", check_finite=False)[0]
    return block


def _project_out(block: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Remove the components of ``block`` that lie in the span of ``basis``."""
    if basis.shape[1] == 0:
        return block
    return block - times(basis, times(basis, block, transpose=True))


def extend_range(
    delta: np.ndarray,
    basis: np.ndarray,
    width: int,
    power_iters: int,
    normalizer: str,
    rng: np.random.Generator,
    krylov: bool = False,
    symmetric: bool = False,
) -> np.ndarray:
    """Grow an orthonormal basis of ΔW's range from a sketch of ``width`` columns.

    A Gaussian sketch ΔW·Ω is refined by ``power_iters`` passes of ΔWΔWᵀ, each
    normalised by LU (or QR), with the existing ``basis`` projected out, and
    finally orthonormalised. With an empty basis this is Halko, Martinsson &
    Tropp's Algorithm 4.4 (with LU normalisation as in scikit-learn); with a
    non-empty one it is its blocked extension, reusing all earlier work.
    With ``krylov`` every iterate is kept (randomized block Krylov): the basis
    grows by (power_iters + 1)·width columns and its Ritz values are far more
    accurate for the same passes over ΔW (Musco & Musco 2015). With
    ``symmetric``, ``delta`` is a symmetric matrix given by its lower triangle
    (a Gram matrix).

    Cost: 2·power_iters + 1 products of ΔW with an n×width block, then one more
    pass when the caller projects ΔW onto the basis ((power_iters + 1)× wider
    with ``krylov``).

    Returns
    -------
    ndarray, shape (m, basis.shape[1] + new columns), orthonormal columns
    """
    sketch = rng.standard_normal((delta.shape[1], width), dtype=delta.dtype)
    block = _project_out(times(delta, sketch, symmetric=symmetric), basis)
    iterates = []
    for _ in range(power_iters):
        block = _normalize(block, normalizer)
        if krylov:
            iterates.append(block)
        block = _normalize(times(delta, block, transpose=True, symmetric=symmetric), normalizer)
        block = _project_out(times(delta, block, symmetric=symmetric), basis)
    iterates.append(block)
    fresh = scipy.linalg.qr(np.hstack(iterates), mode="economic", check_finite=False)[0]
    if basis.shape[1]:
        # Re-orthogonalise against the old basis: one projection loses orthogonality.
        fresh = scipy.linalg.qr(_project_out(fresh, basis), mode="economic", check_finite=False)[0]
    return np.hstack([basis, fresh])


def projected_values(delta: np.ndarray, basis: np.ndarray, symmetric: bool = False) -> np.ndarray:
    """Singular values of QᵀΔW: each is ≤ the matching σᵢ of ΔW (interlacing).

    They are computed as those of ΔWᵀQ (the same values), a product that reads
    ΔW in place.
    """
    return exact_values(times(delta, basis, transpose=True, symmetric=symmetric))


def randomized_values(
    delta: np.ndarray,
    k: int,
    oversample: int = 10,
    power_iters: int = 2,
    normalizer: str = "lu",
    rng: np.random.Generator | None = None,
    krylov: bool = False,
) -> np.ndarray:
    """Top-k singular values by the randomized range finder (one shot, fixed k).

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64, finite
    k : int
        How many values to return (k ≤ min(m, n)).
    oversample : int
        Extra sketch columns; p ≥ 10 makes the top k accurate (Halko et al. §10).
    power_iters : int
        Passes of ΔWΔWᵀ; more sharpen slowly decaying spectra.
    normalizer : {"lu", "qr", "none"}
        How the sketch is re-conditioned between power iterations.
    rng : numpy.random.Generator
        Source of the Gaussian sketch (seeded for reproducible results).
    krylov : bool
        Keep every power iterate (randomized block Krylov): with power_iters=3
        the top values are accurate to ~1e-6 where subspace iteration needs
        about 7 iterations for ~1e-5 (benchmarks/results/engines.md).

    Returns
    -------
    ndarray, shape (k,), descending; σ̂ᵢ ≤ σᵢ for every i.

    References
    ----------
    Halko, Martinsson & Tropp, "Finding structure with randomness", SIAM Review
    53(2), 2011, Algorithms 4.3/4.4 and 5.1. Musco & Musco, "Randomized block
    Krylov methods for stronger and faster approximate singular value
    decomposition", NeurIPS 2015, Algorithm 2.
    """
    rng = np.random.default_rng() if rng is None else rng
    oriented = delta if delta.shape[0] >= delta.shape[1] else delta.T
    width = min(k + oversample, min(delta.shape))
    empty = np.empty((oriented.shape[0], 0), dtype=delta.dtype)
    basis = extend_range(oriented, empty, width, power_iters, normalizer, rng, krylov)
    return projected_values(oriented, basis)[:k]


def lanczos_values(
    delta: np.ndarray, k: int, solver: str = "arpack", rng: np.random.Generator | None = None
) -> np.ndarray:
    """Top-k singular values by a Krylov method (``scipy.sparse.linalg.svds``), values only.

    The values are Ritz values of a Krylov projection, so they converge from
    below to σᵢ to the solver's tolerance (near machine precision here).

    Parameters
    ----------
    delta : ndarray, shape (m, n), finite
    k : int
        How many values, 1 ≤ k < min(m, n).
    solver : {"arpack", "propack"}
    rng : numpy.random.Generator
        Draws the starting vector.

    Returns
    -------
    ndarray, shape (k,), descending

    References
    ----------
    Lehoucq, Sorensen & Yang, ARPACK Users' Guide, SIAM 1998; Larsen, PROPACK (1998).
    """
    # Imported here: scipy.sparse takes a quarter of the start-up of commands that
    # never decompose (recommend, check, plot).
    from scipy.sparse.linalg import svds

    rng = np.random.default_rng() if rng is None else rng
    values = svds(delta, k=k, solver=solver, return_singular_vectors=False, rng=rng)
    return np.sort(values)[::-1]
