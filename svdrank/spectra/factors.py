"""The best rank-r approximation of a layer's update, with singular vectors, as LoRA factors.

Extraction needs the top r singular triplets of ΔW (Eckart-Young: U_r·Σ_r·V_rᵀ
is the best rank-r approximation in the Frobenius norm) and nothing else. When
r is small against min(m, n), a randomized range finder with power iterations
and oversampling gets them in a few passes over ΔW; otherwise the top r
eigenvectors of the Gram matrix (large layers) or LAPACK's divide-and-conquer
SVD (small ones) do. Where the analysis already sketched ΔW or reduced its Gram
matrix, :func:`sketch_svd` and :func:`gram_svd` take the triplets from that
work instead of starting over. The factors are then split evenly,
B = U_r·√Σ_r and A = √Σ_r·V_rᵀ (divided by √s for a LoRA scale s), so neither
factor carries the whole magnitude when it is cast to BF16 or F16.

float32 stays float32 through the products; the sums of squares that give
the error accumulate in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from svdrank.spectra.kernels import (
    column_sums_of_squares,
    extend_range,
    smaller_gram,
    sum_of_squares,
    times,
)
from svdrank.spectra.tridiagonal import Tridiagonal, top_eigenvectors, tridiagonalize

RANDOMIZED_SHARE = 0.2
"""The sketch (r + oversample columns) is used while it is at most this share of min(m, n);
past it a full SVD is cheaper than the passes of the range finder."""
GRAM_FROM = 512
"""Past the sketch's share, layers with min(m, n) at least this take their vectors from the
Gram matrix (one SYRK, its tridiagonal reduction, the top r eigenvectors); smaller ones from
gesdd."""
RESIDUAL_CHUNK_BYTES = 16 << 20
"""The residual ΔW − s·B·A is formed this many bytes of ΔW at a time."""
PROJECTION_FLOOR = 1e-3
"""The error of factors from ΔW's projection is taken without ΔW (:func:`projected_residual_energy`)
only while it is at least this share of ‖ΔW‖²: the float32 rounding of the products it rests
on is a few 1e-7 of ‖ΔW‖² (measured), which below this share could reach 1e-3 of the error²
(5e-4 of the error reported)."""
CAST_TOLERANCE = 1e-3
"""…and only while the cast's terms it leaves out are bounded by this share of the error²."""


@dataclass(frozen=True)
class TruncatedSvd:
    """The top r singular triplets of a matrix: ΔW ≈ left·diag(values)·right.

    Attributes
    ----------
    left : ndarray, shape (m, r)
        Orthonormal columns U_r, the dtype of the input.
    values : ndarray of float64, shape (r,)
        σ₁ ≥ … ≥ σ_r ≥ 0.
    right : ndarray, shape (r, n)
        Orthonormal rows V_rᵀ, the dtype of the input.
    method : {"exact", "randomized", "core"}
        How they were computed.
    tail_energy : float or None
        Σ_{i>r} σᵢ² in float64 when every value was computed (the optimal
        error², summed from the tail itself rather than as ‖ΔW‖² − Σ_{i≤r} σᵢ²,
        which cancels when the tail is small); None otherwise.
    """

    left: np.ndarray
    values: np.ndarray
    right: np.ndarray
    method: str
    tail_energy: float | None = None

    @property
    def kept_energy(self) -> float:
        """Σ_{i≤r} σᵢ², in float64: the energy of ΔW the approximation holds."""
        return float(np.sum(np.square(self.values)))


def truncated_svd(
    delta: np.ndarray,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    normalizer: str = "lu",
    rng: np.random.Generator | None = None,
    method: str = "auto",
) -> TruncatedSvd:
    """Compute the top ``rank`` singular triplets of ``delta``.

    ``auto`` sketches when rank + oversample ≤ 20 % of min(m, n) and runs
    LAPACK gesdd otherwise (see :func:`randomized_svd` and :func:`exact_svd`).

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64, finite
    rank : int
        1 ≤ rank ≤ min(m, n).
    oversample, power_iters, normalizer, rng
        Settings of the randomized route (see :func:`randomized_svd`).
    method : {"auto", "exact", "gram", "randomized"}
        ``auto``: randomized while the sketch is at most 20 % of min(m, n),
        else gram for min(m, n) ≥ 512, else exact.

    Returns
    -------
    TruncatedSvd
    """
    if not 1 <= rank <= min(delta.shape):
        raise ValueError(f"rank {rank} is not in [1, {min(delta.shape)}]")
    if method == "auto":
        if rank + oversample <= RANDOMIZED_SHARE * min(delta.shape):
            method = "randomized"
        else:
            method = "gram" if min(delta.shape) >= GRAM_FROM else "exact"
    if method == "exact":
        return exact_svd(delta, rank)
    if method == "gram":
        return gram_svd(delta, rank)
    return randomized_svd(delta, rank, oversample, power_iters, normalizer, rng)


def gram_svd(delta: np.ndarray, rank: int, reduction: Tridiagonal | None = None) -> TruncatedSvd:
    """Top ``rank`` triplets from the eigenvectors of the smaller Gram matrix.

    G = ΔWᵀΔW (or ΔWΔWᵀ when smaller) by one SYRK, reduced to tridiagonal
    form (sytrd) unless its ``reduction`` is given, its top ``rank``
    eigenvectors from the reduction (:func:`~svdrank.spectra.tridiagonal.top_eigenvectors`),
    then ΔW·V = U·Σ. Cost m·n² + 4/3·n³ + stevd + 2·n²·rank + 2·m·n·rank
    (n = min(m, n)); with the reduction ``diff``'s Gram engine already made,
    only the last three.

    Accuracy: the eigenvectors are those of G to O(ε·σ₁²/gap); the
    approximation U·Σ·Vᵀ = ΔW·V·Vᵀ is the projection of ΔW on their span, whose
    error is second order in that of the vectors (callers measure it and fall
    back to :func:`exact_svd`). σᵢ are the norms of ΔW·vᵢ.

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64, finite
    rank : int
    reduction : Tridiagonal, optional
        The reduction of ``smaller_gram(delta)`` (of ΔW's Gram matrix, not another's).

    Returns
    -------
    TruncatedSvd
        With ``method="gram"``.

    References
    ----------
    Golub & Van Loan, Matrix Computations, 4th ed., §8.6.
    """
    if reduction is None:
        reduction = tridiagonalize(smaller_gram(delta))
    return vectors_svd(delta, top_eigenvectors(reduction, rank)[1])


def vectors_svd(delta: np.ndarray, vectors: np.ndarray) -> TruncatedSvd:
    """Top triplets from the top eigenvectors V of ΔW's smaller Gram matrix: ΔW·V = U·Σ.

    σᵢ are the norms of ΔW·vᵢ (see :func:`gram_svd`); one product m·n·r.

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64, finite
    vectors : ndarray, shape (min(m, n), r)
        Orthonormal eigenvectors of ``smaller_gram(delta)``, largest first.

    Returns
    -------
    TruncatedSvd
        With ``method="gram"``.
    """
    vectors = np.asarray(vectors, dtype=delta.dtype)
    tall = delta.shape[0] >= delta.shape[1]
    projected = times(delta, vectors, transpose=not tall)
    values = np.sqrt(column_sums_of_squares(projected))
    other = np.divide(
        projected, np.where(values > 0, values, 1.0).astype(delta.dtype), out=projected
    )
    if tall:
        return TruncatedSvd(other, values, np.ascontiguousarray(vectors.T), "gram")
    return TruncatedSvd(vectors, values, np.ascontiguousarray(other.T), "gram")


def exact_svd(delta: np.ndarray, rank: int) -> TruncatedSvd:
    """Top ``rank`` triplets from LAPACK's thin SVD (gesdd; gesvd if it fails to converge).

    Cost O(m·n·min(m, n)) flops, several times the values-only SVD. Backward
    stable: the approximation's error is optimal to O(ε·σ₁).

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64, finite
    rank : int

    Returns
    -------
    TruncatedSvd
        With ``method="exact"``.
    """
    try:
        u, s, vt = scipy.linalg.svd(delta, full_matrices=False, check_finite=False)
    except np.linalg.LinAlgError:
        u, s, vt = scipy.linalg.svd(
            delta, full_matrices=False, check_finite=False, lapack_driver="gesvd"
        )
    tail = float(np.sum(np.square(s[rank:], dtype=np.float64)))
    return TruncatedSvd(u[:, :rank], s[:rank].astype(np.float64), vt[:rank], "exact", tail)


def randomized_svd(
    delta: np.ndarray,
    rank: int,
    oversample: int = 10,
    power_iters: int = 2,
    normalizer: str = "lu",
    rng: np.random.Generator | None = None,
) -> TruncatedSvd:
    """Top ``rank`` triplets by the randomized range finder and a small SVD.

    A basis Q (m × (rank + oversample)) of ΔW's dominant range comes from a
    Gaussian sketch refined by ``power_iters`` passes of ΔWΔWᵀ, each
    normalised by LU (or QR) (Algorithm 4.4); the SVD of the small matrix
    QᵀΔW = Ũ·Σ·Vᵀ then gives U = Q·Ũ (Algorithm 5.1). The longer side of ΔW
    carries the basis.

    Cost: 2·power_iters + 2 products of ΔW with a block of rank + oversample
    columns, plus O((m + n)·(rank + oversample)²) for the small factorisations.

    Accuracy: every σ̂ᵢ ≤ σᵢ, and the error ‖ΔW − U·Σ·Vᵀ‖_F exceeds the
    optimal √(Σ_{i>r} σᵢ²) by a factor that tends to 1 as the power
    iterations grow, faster the larger the gap σ_r/σ_{r+oversample}. With the
    defaults (oversample 10, power_iters 2) it was within 0.1 % on power-law
    spectra (σᵢ ∝ i^-1, i^-2) and exponential ones whenever the sketch is at
    most 20 % of min(m, n) (the ``auto`` route); callers that must guarantee
    a bound measure the error and fall back to :func:`exact_svd`.

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64, finite
    rank : int
    oversample : int
        Extra sketch columns.
    power_iters : int
        Passes of ΔWΔWᵀ.
    normalizer : {"lu", "qr", "none"}
    rng : numpy.random.Generator

    Returns
    -------
    TruncatedSvd
        With ``method="randomized"``.

    References
    ----------
    Halko, Martinsson & Tropp, "Finding structure with randomness", SIAM
    Review 53(2), 2011, Algorithms 4.4 and 5.1.
    """
    rng = np.random.default_rng() if rng is None else rng
    tall = delta.shape[0] >= delta.shape[1]
    oriented = delta if tall else delta.T
    width = min(rank + oversample, min(delta.shape))
    empty = np.empty((oriented.shape[0], 0), dtype=delta.dtype)
    basis = extend_range(oriented, empty, width, power_iters, normalizer, rng)
    return sketch_svd(delta, Sketch(basis, left=tall), rank)


@dataclass(frozen=True)
class Sketch:
    """An orthonormal basis Q of one side of ΔW's dominant singular subspace.

    Attributes
    ----------
    basis : ndarray, shape (m, w) or (n, w)
        Orthonormal columns in ΔW's column space (``left``) or row space.
    left : bool
        Which side Q spans.
    projection : ndarray, optional
        ΔWᵀ·Q (n × w) for a left basis, ΔW·Q (m × w) for a right one, where
        already computed (the engine's last pass).
    """

    basis: np.ndarray
    left: bool
    projection: np.ndarray | None = None

    @property
    def width(self) -> int:
        """The number of columns of Q."""
        return int(self.basis.shape[1])


def sketch_svd(delta: np.ndarray, sketch: Sketch, rank: int) -> TruncatedSvd:
    """Top ``rank`` triplets of ΔW projected on a sketch's basis (Halko et al., Algorithm 5.1).

    With Q spanning ΔW's column space, ΔW ≈ Q·QᵀΔW and the SVD of the small
    (QᵀΔW)ᵀ = ΔWᵀQ = V·Σ·Ŵᵀ gives U = Q·Ŵ; a basis of the row space is the
    same on ΔWᵀ. Cost: one product of ΔW with Q (none when the sketch holds
    it) and an SVD of an n × w matrix (m × w for a right basis).

    Accuracy: that of the range finder that made Q (see :func:`randomized_svd`):
    σ̂ᵢ ≤ σᵢ, and the error tends to the optimum as Q holds more of the top
    singular subspace; callers measure it.

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64, finite
    sketch : Sketch
        Of this ΔW, at least ``rank`` columns wide.
    rank : int

    Returns
    -------
    TruncatedSvd
        With ``method="randomized"``.

    References
    ----------
    Halko, Martinsson & Tropp, "Finding structure with randomness", SIAM
    Review 53(2), 2011, Algorithm 5.1.
    """
    oriented = delta if sketch.left else delta.T
    projection = sketch.projection
    if projection is None:
        # (QᵀΔW)ᵀ = ΔWᵀQ reads ΔW in place; its SVD is V·Σ·Ũᵀ.
        projection = times(oriented, sketch.basis, transpose=True)
    small_v, values, small_ut = scipy.linalg.svd(
        projection, full_matrices=False, check_finite=False
    )
    near = times(sketch.basis, np.ascontiguousarray(small_ut[:rank].T))
    far = np.ascontiguousarray(small_v[:, :rank].T)
    values = values[:rank].astype(np.float64)
    if sketch.left:
        return TruncatedSvd(near, values, far, "randomized")
    return TruncatedSvd(far.T, values, near.T, "randomized")


def lora_factors(
    svd: TruncatedSvd, scale: float, *, overwrite: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Split a truncated SVD into LoRA factors with scale·B·A = U_r·Σ_r·V_rᵀ.

    B = U_r·√(Σ_r/s) and A = √(Σ_r/s)·V_rᵀ: both factors carry the same
    magnitude (‖B‖_F = ‖A‖_F), the best split for a narrow storage dtype.

    Parameters
    ----------
    svd : TruncatedSvd
    scale : float
        The LoRA scale s > 0 the loader multiplies B·A by (α/r in PEFT).
    overwrite : bool
        Scale the SVD's own vectors into the factors (no copies: the SVD's
        vectors are the factors afterwards, for a caller done with them).

    Returns
    -------
    b : ndarray, shape (m, r)
    a : ndarray, shape (r, n)
        In the dtype of the SVD's vectors.
    """
    root = np.sqrt(svd.values / scale).astype(svd.left.dtype)
    if overwrite:
        return (
            np.multiply(svd.left, root, out=svd.left),
            np.multiply(root[:, None], svd.right, out=svd.right),
        )
    return svd.left * root, root[:, None] * svd.right


def residual_energy(delta: np.ndarray, b: np.ndarray, a: np.ndarray, scale: float) -> float:
    """‖ΔW − s·B·A‖_F², formed a block of rows at a time and summed in float64.

    The residual is computed directly, not as ‖ΔW‖² − ‖s·B·A‖², which would
    lose every digit to cancellation when the approximation is good. Cost:
    one product m·n·r; memory: one block of 16 MB (and B's rows in it, widened).

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64
    b : ndarray, shape (m, r)
    a : ndarray, shape (r, n)
        Any floating dtype (BF16, F16 factors are widened to ``delta``'s dtype,
        exactly).
    scale : float

    Returns
    -------
    float
    """
    # The scale goes on A (r × n), the smaller copy when m > r; B is widened a block at a time.
    scaled = np.empty(a.shape, dtype=delta.dtype, order="F")  # one copy, widened and scaled
    a = np.multiply(a, delta.dtype.type(scale), out=scaled, dtype=delta.dtype, casting="unsafe")
    rows = max(1, RESIDUAL_CHUNK_BYTES // max(delta.shape[1] * delta.itemsize, 1))
    return sum(
        _block_residual(delta[start : start + rows], b[start : start + rows], a)
        for start in range(0, delta.shape[0], rows)
    )


def projected_residual_energy(
    total: float,
    values: np.ndarray,
    unrounded: tuple[np.ndarray, np.ndarray],
    stored: tuple[np.ndarray, np.ndarray],
    scale: float,
) -> float | None:
    """‖ΔW − s·B_s·A_s‖_F² of stored factors split from ΔW's projection, without ΔW.

    For the triplets of :func:`vectors_svd` (P = ΔW·V on orthonormal
    eigenvectors V, σᵢ = ‖P·eᵢ‖), the unrounded factors B₀ = (P/σ)·√(Σ/s) and
    A₀ = √(Σ/s)·Vᵀ give s·B₀·A₀ = P·Vᵀ, and the stored ones differ from them
    by their rounding E_B = B_s − B₀, E_A = A_s − A₀. Then

        ‖ΔW − s·B_s·A_s‖² = (‖ΔW‖² − Σσᵢ²) + s·Σσᵢ·(‖E_B·eᵢ‖² + ‖eᵢᵀ·E_A‖²) + δ.

    The first term is the error of the projection (ΔW − P·Vᵀ is orthogonal to
    every matrix with rows in span(V) or columns in span(P)); the second is
    the rounding's, whose parts s·E_B·A₀ and s·B₀·E_A lie in those two spaces.
    δ holds 2·s²⟨E_B·A₀, B₀·E_A⟩ and the terms of s·E_B·E_A, bounded here by
    norms, and the float32 rounding of P and of V's orthogonality, which
    perturbs the first term by a few 1e-7·‖ΔW‖² (measured against float64;
    at n = 2048 and a 10 % error, 2e-7 to 5e-7 of the error² for BF16, F16
    and F32 factors; tests allow 1e-6·‖ΔW‖²).
    Cost O((m + n)·r) against the m·n·r of the residual formed from ΔW
    (:func:`residual_energy`), which the caller uses where this returns None.

    Parameters
    ----------
    total : float
        ‖ΔW‖_F², summed in float64.
    values : ndarray of float64, shape (r,)
        σᵢ, the norms of the projection's columns.
    unrounded : (ndarray, ndarray)
        B₀ (m, r) and A₀ (r, n), float32 or float64.
    stored : (ndarray, ndarray)
        B_s and A_s, the same shapes, any floating dtype (they may be B₀ and A₀ themselves).
    scale : float
        The LoRA scale s.

    Returns
    -------
    float or None
        None when the first term is below PROJECTION_FLOOR·‖ΔW‖² or δ's bound
        above CAST_TOLERANCE of the result.
    """
    projection = total - float(np.sum(np.square(values)))
    if projection < PROJECTION_FLOOR * total:
        return None
    b_sums = _rounding_sums(unrounded[0], stored[0])
    a_sums = _rounding_sums(unrounded[1].T, stored[1].T)
    b_rounding = scale * float(values @ b_sums)  # ‖s·E_B·A₀‖²
    a_rounding = scale * float(values @ a_sums)  # ‖s·B₀·E_A‖²
    both = scale * math.sqrt(float(b_sums.sum()) * float(a_sums.sum()))  # ≥ ‖s·E_B·E_A‖_F
    reach = math.sqrt(projection) + math.sqrt(b_rounding) + math.sqrt(a_rounding)
    bound = 2 * math.sqrt(b_rounding * a_rounding) + 2 * reach * both + both**2
    if bound > CAST_TOLERANCE * projection:
        return None
    return projection + b_rounding + a_rounding


def _rounding_sums(unrounded: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Σ over rows of (stored − unrounded)² for each column, in float64, a block of rows at a time.

    The difference of a value and its rounding is exact in float32 (Sterbenz).
    """
    sums = np.zeros(unrounded.shape[1])
    if stored is unrounded:
        return sums
    rows = max(1, RESIDUAL_CHUNK_BYTES // max(unrounded.shape[1] * unrounded.itemsize, 1))
    for start in range(0, unrounded.shape[0], rows):
        block = unrounded[start : start + rows]
        error = np.subtract(stored[start : start + rows], block, dtype=block.dtype)
        sums += np.square(error, out=error).sum(axis=0, dtype=np.float64)
    return sums


def _block_residual(delta: np.ndarray, b: np.ndarray, a: np.ndarray) -> float:
    """‖ΔW − B·A‖_F² of a block of rows, B widened to ΔW's dtype (A is scaled, Fortran order).

    The product is taken as (Aᵀ·Bᵀ)ᵀ so that it comes out of BLAS in ΔW's row
    order: the subtraction then reads both in memory order (against B·A's
    column order, strided, it cost as much as the product itself).
    """
    if not b.size:
        return sum_of_squares(delta)
    widened = np.asarray(b, dtype=delta.dtype)
    difference = times(a, widened.T, transpose=True).T
    difference -= delta
    return sum_of_squares(difference)


def relative_error(residual: float, total: float) -> float:
    """‖ΔW − s·B·A‖_F / ‖ΔW‖_F from the two energies; 0 for a zero update."""
    return math.sqrt(residual / total) if total > 0 else 0.0
