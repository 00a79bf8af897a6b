"""Storage rounding noise in ΔW, and the signal rank that stands above it.

A checkpoint stored in BF16, F16 or F8 rounds every entry to its format's grid, so
the ΔW read from two files is the update L plus a full-rank noise matrix N whose
entries are independent with variance v_ij = u_ij²/12, u the unit in the last
place (ulp) of the stored value. Weyl's inequality |σᵢ(L + N) − σᵢ(L)| ≤ ‖N‖₂
makes any threshold τ ≥ ‖N‖₂ safe: #{σᵢ(ΔW) > τ} never exceeds rank L. This
module estimates ‖N‖₂ from the variance profile (a simulated draw) and from ΔW
itself (random sign flips), sets τ a Gavish-Donoho factor above it, and reads
from the spectrum the signal rank and the energy ranks of the clean update.

Everything is arrays in, arrays out; the one random source is the ``rng``
passed in. float32 stays float32 through the draws and the Lanczos products;
sums of variances and energies accumulate in float64.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from svdrank.errors import UsageError
from svdrank.inputs.checkpoint import DTYPES
from svdrank.spectra.kernels import CHUNK_ELEMENTS, exact_values, times_vector


@dataclass(frozen=True)
class Grid:
    """A binary floating-point storage format, as far as its rounding error goes.

    Parameters
    ----------
    mantissa_bits : int
        Stored significand bits p: the ulp of x is 2^(⌊log₂|x|⌋ − p).
    exponent_bits : int
        Width of the exponent field; the bias is 2^(exponent_bits − 1) − 1.
    """

    mantissa_bits: int
    exponent_bits: int

    @property
    def bias(self) -> int:
        """The exponent bias."""
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def min_exponent(self) -> int:
        """The exponent of the smallest normal number; subnormals keep its ulp."""
        return 1 - self.bias


GRIDS: dict[str, Grid] = {
    "F64": Grid(52, 11),
    "F32": Grid(23, 8),
    "F16": Grid(10, 5),
    "BF16": Grid(7, 8),
    "F8_E4M3": Grid(3, 4),
    "F8_E5M2": Grid(2, 5),
}
"""Storage grids by safetensors dtype name (F8_E8M0, a scale format, has no uniform rounding)."""
STORAGE_BITS: dict[str, int] = {name: grid.mantissa_bits for name, grid in GRIDS.items()}
"""Significand bits per grid."""
MIN_EXPONENT: dict[str, int] = {name: grid.min_exponent for name, grid in GRIDS.items()}
"""Minimum normal exponent per grid (F32 and BF16: −126, F16: −14, E4M3: −6, E5M2: −14)."""

_EMBEDDED: dict[str, tuple[str, int]] = {"F32": ("BF16", 0xFFFF)}
"""A wider dtype whose words may hold a narrower grid: (that grid, mask of the bits it zeroes)."""
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
"""Unsigned integer views of stored words by item size."""
_DETECT_ELEMENTS = 1 << 16
"""Chunk of the grid check: a tensor that is not on the narrower grid stops after the first."""
_AGREEMENT = 1.25
"""Sim and flip edges within this ratio agree (take the larger), else take the smaller."""
_PROFILE_SLACK = 1.1
"""The profile bound times this is taken above E‖N‖₂ (Bandeira-van Handel's (1 + ε))."""
_DOMINANT_ENTRY = 0.5
"""Entries dominate the edge once the largest reaches this share of the profile bound."""
_ROW_NORM_SPREAD = 0.9
"""The noisiest row's norm times this is taken below ‖N‖₂."""
_LANCZOS_TOL = 2e-4
"""Stop Lanczos when σ̂₁ grew by less than this share over the last ``_LANCZOS_WINDOW`` steps."""
_LANCZOS_WINDOW = 4
_LANCZOS_STEPS = 64
_EXACT_BELOW = 96
"""Smaller dimensions than this get σ₁ by an exact SVD (cheaper than Lanczos there)."""


def storage_grid(stored: np.ndarray, dtype: str) -> str:
    """Name the grid a stored tensor's values lie on.

    That is its safetensors dtype, except an ``F32`` tensor whose words all have
    their low 16 bits zero: it holds BF16 values (an upcast BF16 checkpoint), and
    its rounding noise is BF16's. The check reads a chunk of words at a time and
    stops at the first chunk with a nonzero low half, so a genuine F32 tensor
    costs one chunk (65 536 words). F32 holding F16 values is not detected.

    Parameters
    ----------
    stored : ndarray
        The tensor as read (any shape), in the dtype ``dtype`` names.
    dtype : str
        Its safetensors dtype name.

    Returns
    -------
    str
        A key of :data:`GRIDS` for floating dtypes, else ``dtype`` unchanged.

    Examples
    --------
    >>> import ml_dtypes
    >>> upcast = np.array([0.1, -3.0], dtype=ml_dtypes.bfloat16).astype(np.float32)
    >>> storage_grid(upcast, "F32"), storage_grid(np.float32([0.1, -3.0]), "F32")
    ('BF16', 'F32')
    """
    if dtype not in _EMBEDDED or stored.size == 0:
        return dtype
    narrower, mask = _EMBEDDED[dtype]
    words = np.atleast_1d(stored).view(_WORDS[stored.itemsize])
    for rows in _row_slices(words.shape, _DETECT_ELEMENTS):
        if np.bitwise_and(words[rows], mask).any():
            return dtype
    return narrower


def rounding_variance(stored: np.ndarray, grid: str, out: np.ndarray | None = None) -> np.ndarray:
    """Per-entry variance u²/12 of the rounding that put ``stored`` on ``grid``.

    u(x) = 2^(max(⌊log₂|x|⌋, e_min) − p) with p = ``STORAGE_BITS[grid]`` and
    e_min = ``MIN_EXPONENT[grid]``, so subnormals and zeros get the grid's
    smallest spacing. ⌊log₂|x|⌋ is read from the exponent field of the stored
    words: for formats of 8 or 16 bits one table lookup per entry (a table of
    every code), for F32 and F64 a shift, a mask and a lookup. No floating-point
    arithmetic touches the values, so the result is exact (to float32); variances
    outside float32's range saturate at its maximum or flush to zero (BF16:
    |x| > 2^70 or < 2^-65; F32: |x| < 2^-49, where they do not matter).

    Cost: one pass over ``stored``, a bounded chunk at a time (1 M entries); about
    2 ns per entry here. It works on any slice of rows, so a caller forming ΔW
    chunk by chunk can fill ``out`` chunk by chunk; when both checkpoints are
    rounded, add the base's variance to the tuned's.

    Parameters
    ----------
    stored : ndarray
        Stored values, any shape, in a dtype of :data:`GRIDS` (float64, float32,
        float16, ``ml_dtypes`` bfloat16, float8_e4m3fn or float8_e5m2).
    grid : str
        The grid they lie on (see :func:`storage_grid`); its exponent range must
        lie within the stored dtype's.
    out : ndarray of float32, optional
        Where to write, shape of ``stored``.

    Returns
    -------
    ndarray of float32, shape of ``stored``

    Raises
    ------
    UsageError
        For a dtype or grid with no rounding model (integers, F8_E8M0).

    References
    ----------
    Widrow & Kollár, Quantization Noise, Cambridge University Press 2008, ch. 4
    (uniform rounding error, variance u²/12). Higham, Accuracy and Stability of
    Numerical Algorithms, 2nd ed., SIAM 2002, §2.1 (spacing of floating-point numbers).

    Examples
    --------
    The ulp doubles with each binade, so the variance quadruples:

    >>> variance = rounding_variance(np.float16([1.0, -3.0, 0.5]), "F16")
    >>> variance / variance[0]
    array([1.  , 4.  , 0.25], dtype=float32)
    """
    stored = np.asarray(stored)
    table = _variance_table(_stored_layout(stored.dtype), _check_grid(grid))
    out = np.empty(stored.shape, dtype=np.float32) if out is None else out
    layout = GRIDS[_stored_layout(stored.dtype)]
    words, written = np.atleast_1d(stored).view(_WORDS[stored.itemsize]), np.atleast_1d(out)
    for rows in _row_slices(words.shape, CHUNK_ELEMENTS):
        codes = words[rows]
        if stored.itemsize > 2:
            codes = np.right_shift(codes, layout.mantissa_bits)
            np.bitwise_and(codes, (1 << layout.exponent_bits) - 1, out=codes)
        np.take(table, codes, out=written[rows], mode="clip")
    return out


@dataclass(frozen=True)
class NoiseFloor:
    """The estimated size of a layer's storage noise, and the threshold set from it.

    Parameters
    ----------
    noise_energy : float
        Σ v_ij, the expected ‖N‖_F² (float64 sum).
    profile_bound : float
        √(maxᵢ Σⱼ v_ij) + √(maxⱼ Σᵢ v_ij): the Latała / Bandeira-van Handel
        scale of E‖N‖₂ (about the edge for iid entries, up to ~2× above it for
        uneven profiles). Reported, not used by the rule.
    max_entry : float
        maxᵢⱼ √(3·roundings·v_ij), the largest entry the noise can have (and
        so the least ‖N‖₂ can be when that entry is drawn at its extreme).
    sim_edge : float
        σ₁ of simulated noise draws with the profile, max over the draws,
        floored by ``max_entry``.
    flip_edge : float
        σ₁ of S ⊙ ΔW for random signs S, max over the draws made (they stop
        once one passes ``agreement`` × ``sim_edge``: the edge is then the
        sim edge whatever the others give).
    edge : float
        The estimate of ‖N‖₂ the threshold is built on.
    threshold : float
        τ = λ*(β) / (1 + √β) · ``edge``.
    """

    noise_energy: float
    profile_bound: float
    max_entry: float
    sim_edge: float
    flip_edge: float
    edge: float
    threshold: float


@dataclass(frozen=True)
class ProfileBounds:
    """Bounds on a layer's rounding-noise profile, read from its stored values' squares.

    Each rounding of x errs with variance v = u²/12 where the ulp
    u = 2^(⌊log₂|x|⌋ − p) lies in (|x|·2^(−p−1), |x|·2^(−p)]: so v lies
    between x²·4^(−p−1)/12 and x²·4^(−p)/12 (subnormals and zeros: the grid's
    smallest v). Row, column and total sums of x² therefore bound the row,
    column and total sums of v within a factor of 4, at the cost of three
    reductions over data already read (no per-entry variance is formed).

    Attributes
    ----------
    energy : float
        Upper bound of Σ v_ij.
    row_max, column_max : float
        Upper bounds of maxᵢ Σⱼ v_ij and maxⱼ Σᵢ v_ij.
    entry_max : float
        Upper bound of max v_ij.
    roundings : int
        How many rounded tensors the sums add up (1 or 2).
    exact : bool
        The sums are those of the variances themselves (see
        :func:`variance_profile`), not bounds from the squares: the profile's
        lower bound is then the sums, not a quarter of them.
    """

    energy: float
    row_max: float
    column_max: float
    entry_max: float
    roundings: int
    exact: bool = False

    @property
    def least_energy(self) -> float:
        """The least Σ v_ij can be: the sum itself when exact, else a quarter of its bound."""
        return self.energy if self.exact else self.energy / 4.0


def square_scale(grid: str) -> float:
    """Return 4^(−p)/12: the factor from x² to the largest rounding variance on ``grid``.

    Examples
    --------
    >>> square_scale("BF16") == 2.0 ** -14 / 12
    True
    """
    return math.ldexp(1.0 / 12.0, -2 * GRIDS[_check_grid(grid)].mantissa_bits)


def smallest_variance(grid: str) -> float:
    """Return the rounding variance of subnormals and zeros on ``grid``: 4^(e_min − p)/12."""
    target = GRIDS[_check_grid(grid)]
    return math.ldexp(1.0 / 12.0, 2 * (target.min_exponent - target.mantissa_bits))


def entry_dominates(bounds: ProfileBounds) -> bool:
    """Whether single entries may set the noise's edge (heavy tails, a "super weight").

    True when the largest entry the noise can have, √(3·r·max v), reaches half
    the profile bound. The edge is then set by a few entries whose actual
    rounding errors the sign-flip edge sees and the storage model does not,
    so τ may fall below the low end of :func:`threshold_bounds`.
    """
    profile = math.sqrt(bounds.row_max) + math.sqrt(bounds.column_max)
    return math.sqrt(3.0 * bounds.roundings * bounds.entry_max) >= _DOMINANT_ENTRY * profile


def threshold_bounds(bounds: ProfileBounds, shape: tuple[int, int]) -> tuple[float, float]:
    """Bracket the threshold τ that :func:`noise_floor` would set, without any draw.

    High: the profile bound √(max row sum) + √(max column sum) of the upper
    variances (or the largest entry, √(3·r·max v), when larger: heavy tails),
    times 1.1 for the profile bound's own slack, times ``_AGREEMENT`` (the
    combined edge never exceeds the simulated edge by more), times the
    Gavish-Donoho factor. Low: the norm of the noisiest row or column of the
    lower variances (‖N‖₂ is at least any row's norm), over ``_AGREEMENT``,
    times 0.9 for that norm's own spread. The bracket holds when the noise
    model holds: most entries changed and no entry dominates (see
    :func:`entry_dominates`); otherwise the sign-flip edge can put τ lower,
    and callers estimate τ itself.

    Parameters
    ----------
    bounds : ProfileBounds
    shape : tuple of int
        (m, n) of ΔW.

    Returns
    -------
    tuple of float
        (low, high), low < high.
    """
    beta = min(shape) / max(shape)
    factor = gavish_donoho_factor(beta) / (1.0 + math.sqrt(beta))
    profile = math.sqrt(bounds.row_max) + math.sqrt(bounds.column_max)
    largest = math.sqrt(3.0 * bounds.roundings * bounds.entry_max)
    high = factor * _AGREEMENT * max(_PROFILE_SLACK * profile, largest)
    row_norm = math.sqrt(max(bounds.row_max, bounds.column_max) * (1.0 if bounds.exact else 0.25))
    low = factor * _ROW_NORM_SPREAD * row_norm / _AGREEMENT
    return low, high


def variance_profile(variance: np.ndarray, roundings: int) -> ProfileBounds:
    """Sum a per-entry variance exactly: its rows, columns, total and largest entry.

    One chunked float64 pass over ``variance`` (:func:`rounding_variance` of
    the rounded sides): the profile of :class:`ProfileBounds` with ``exact``
    set, which brackets τ about twice as tightly as the bounds from squares.
    """
    total, row_max, column_max, largest = _sums(variance)
    return ProfileBounds(total, row_max, column_max, largest, roundings, exact=True)


def noise_floor(
    delta: np.ndarray,
    variance: np.ndarray,
    rng: np.random.Generator,
    draws: int = 2,
    agreement: float = _AGREEMENT,
    roundings: int = 1,
    profile: ProfileBounds | None = None,
) -> NoiseFloor:
    """Estimate ‖N‖₂ of ΔW's storage noise and the threshold τ above which σᵢ are signal.

    Two estimates of the edge, each the largest σ₁ over ``draws`` matrices:

    - simulated: N_ij ~ U(−√(3v_ij), √(3v_ij)) independent, the storage model,
      floored by the largest entry the noise can have, maxᵢⱼ √(3·r·v_ij) with
      r = ``roundings`` (σ₁(N) ≥ max |N_ij|, which decides heavy-tailed layers);
    - sign flip (FlipPA): S ⊙ ΔW with independent random signs S. For noise
      with symmetric independent entries S ⊙ N has the law of N, while a
      low-rank L becomes S ⊙ L, spread over all directions; it tracks the
      actual noise when the update is below one ulp (most entries unchanged),
      where the storage model overstates.

    They agree when ΔW is mostly noise; then the larger is taken. When the flip
    edge exceeds the sim edge by more than ``agreement`` the update dominates ΔW
    and the sim edge is taken; when it falls below, ΔW is smaller than the
    model's noise (the update moved few entries by an ulp) and the flip edge is
    taken. τ = λ*(β)/(1 + √β) · edge, Gavish and Donoho's optimal hard
    threshold written as a factor on the noise's edge (1.155 at β = 1, → √2 as
    β → 0): above ‖N‖₂ with a margin for the estimate's error.

    One change to the prototype's rule: with both checkpoints rounded the floor
    is √(3·2·v), not √(3v). Each rounding errs by up to u/2, so an entry of
    the difference can reach (u_t + u_b)/2 ≤ √(6v) while √(3v) is only 0.71 of
    that; on Student-t weights rounded on both sides with a dominant update the
    old floor left τ below ‖N‖₂ (by up to 18 %) in 4 of 216 layers.

    Known gap: when both files are rounded from separate float32 masters and
    the update is about half an ulp in the rows or columns that dominate
    ‖N‖₂, the two roundings are correlated and the noise variance there
    reaches u²/4 against the model's u²/6; if the update also dominates the
    flips, τ can fall up to ~6 % below ‖N‖₂ (measured: 5 %, once in 864 such
    layers, one extra rank). A fine-tune started from the stored base (the
    common case) has single rounding noise, which the model overstates by √2.

    Cost: one pass over ``variance`` for its profile, then 2·``draws`` matrices
    written into one scratch array and, per matrix, a Lanczos run of typically
    20-40 steps (two matrix-vector products each): 0.55 s for a 4096² float32
    ΔW here, 0.4 s of it Lanczos. ΔW is read, never written: the flips go to
    the scratch copy, so another thread may read ΔW meanwhile. Extra memory:
    one m×n array of ΔW's dtype, 1 M-entry temporaries and 64·(m + n) Lanczos
    vectors (4096², float32: 64 MB + 2 MB), besides the caller's ``variance``.

    Accuracy: each σ₁ is a Lanczos lower bound within ~0.5 % (see
    :func:`top_singular_value`). On pure BF16 and F16 rounding noise (iid, row
    and column scales, outlier channels, Student-t, a super weight; square and
    4:1 shapes) the largest σ₁(N)/τ measured was 0.88 (tests/test_noise.py);
    with tuned-only rounding under a known low-rank update, 0.96.

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64, finite
        The layer's update as read.
    variance : ndarray, shape (m, n), float32
        Per-entry noise variance (:func:`rounding_variance` of the tuned
        tensor, plus the base's when the base is rounded too).
    rng : numpy.random.Generator
        Source of the draws, signs and Lanczos start vectors.
    draws : int
        Matrices per estimate (≥ 1); each costs one Lanczos run.
    agreement : float
        The ratio within which the two edges agree (> 1).
    roundings : int
        How many rounded tensors ``variance`` adds up: 2 when base and tuned
        are both stored on a BF16, F16 or F8 grid, else 1.
    profile : ProfileBounds, optional
        ``variance``'s exact sums (:func:`variance_profile`) when the caller
        has them: saves a pass over ``variance``. Bounds from squares are not
        taken (the sums are recomputed).

    Returns
    -------
    NoiseFloor

    Raises
    ------
    UsageError
        If ``draws`` or ``roundings`` is below 1.

    References
    ----------
    Weyl, Math. Ann. 71, 1912 (singular values move at most ‖N‖₂). Latała,
    "Some estimates of norms of random matrices", Proc. AMS 133(5), 2005;
    Bandeira & van Handel, "Sharp nonasymptotic bounds on the norm of random
    matrices with independent entries", Ann. Probab. 44(4), 2016. Hong, Sheng
    & Dobriban, "Selecting the number of components in PCA via random
    signflips", arXiv:2012.02985. Gavish & Donoho, "The optimal hard threshold
    for singular values is 4/√3", IEEE Trans. Inf. Theory 60(8), 2014.
    """
    if draws < 1 or roundings < 1:
        raise UsageError(f"noise_floor needs draws ≥ 1 and roundings ≥ 1, got {draws}, {roundings}")
    sums = None
    if profile is not None and profile.exact:
        sums = (profile.energy, profile.row_max, profile.column_max, profile.entry_max)
    noise_energy, profile_bound, max_variance = _profile(variance, sums)
    scratch = np.empty(delta.shape, dtype=delta.dtype)
    max_entry = math.sqrt(3.0 * roundings * max_variance)
    sim_edge = max(max_entry, *(_sim_edge(scratch, variance, rng) for _ in range(draws)))
    flip_edge = _flip_edges(scratch, delta, rng, draws, agreement * sim_edge)
    edge = combine_edges(sim_edge, flip_edge, agreement)
    beta = min(delta.shape) / max(delta.shape) if delta.size else 1.0
    threshold = gavish_donoho_factor(beta) / (1.0 + math.sqrt(beta)) * edge
    return NoiseFloor(noise_energy, profile_bound, max_entry, sim_edge, flip_edge, edge, threshold)


def combine_edges(sim_edge: float, flip_edge: float, agreement: float = _AGREEMENT) -> float:
    """Pick the edge the threshold stands on: the larger of two that agree, else the smaller.

    Examples
    --------
    >>> combine_edges(1.0, 1.2), combine_edges(1.0, 2.0), combine_edges(1.0, 0.5)
    (1.2, 1.0, 0.5)
    """
    low, high = sorted((sim_edge, flip_edge))
    return high if high <= agreement * low else low


def gavish_donoho_factor(beta: float) -> float:
    """λ*(β), Gavish and Donoho's optimal hard threshold for known noise level.

    τ* = λ*(β)·√M·σ for an M×q matrix of iid noise of standard deviation σ,
    β = q/M; λ*(β) = √(2(β + 1) + 8β / ((β + 1) + √(β² + 14β + 1))).

    Parameters
    ----------
    beta : float
        Aspect ratio min(m, n) / max(m, n), in (0, 1].

    Returns
    -------
    float

    References
    ----------
    Gavish & Donoho, "The optimal hard threshold for singular values is 4/√3",
    IEEE Trans. Inf. Theory 60(8), 2014, eq. (11).

    Examples
    --------
    >>> round(gavish_donoho_factor(1.0), 6) == round(4 / math.sqrt(3), 6)
    True
    """
    root = math.sqrt(beta * beta + 14.0 * beta + 1.0)
    return math.sqrt(2.0 * (beta + 1.0) + 8.0 * beta / ((beta + 1.0) + root))


def _check_grid(grid: str) -> str:
    """Return ``grid`` if it has a rounding model, else raise UsageError."""
    if grid not in GRIDS:
        raise UsageError(f"no rounding model for dtype {grid!r}; known: {', '.join(GRIDS)}")
    return grid


def _stored_layout(dtype: np.dtype) -> str:
    """Name the GRIDS entry of a stored array's NumPy dtype."""
    for name in GRIDS:
        if DTYPES[name] == dtype:
            return name
    raise UsageError(f"no rounding model for arrays of {dtype}; known: {', '.join(GRIDS)}")


@functools.cache
def _variance_table(layout: str, grid: str) -> np.ndarray:
    """u²/12 on ``grid`` for each exponent field of ``layout`` (each code, for ≤ 16 bits)."""
    stored, target = GRIDS[layout], GRIDS[grid]
    exponents = np.maximum(np.arange(1 << stored.exponent_bits), 1) - stored.bias
    ulp_exponents = np.maximum(exponents, target.min_exponent) - target.mantissa_bits
    with np.errstate(over="ignore", under="ignore"):
        table = np.ldexp(1.0 / 12.0, 2 * ulp_exponents)
    table = np.minimum(table, np.finfo(np.float32).max).astype(np.float32)
    width = 1 + stored.exponent_bits + stored.mantissa_bits
    if width <= 16:
        codes = np.arange(1 << width)
        table = table[(codes >> stored.mantissa_bits) & ((1 << stored.exponent_bits) - 1)]
    table.flags.writeable = False
    return table


def _row_slices(shape: tuple[int, ...], elements: int) -> Iterator[slice]:
    """Slices of the leading axis covering about ``elements`` entries each."""
    row = max(1, math.prod(shape[1:]))
    step = max(1, elements // row)
    for start in range(0, shape[0], step):
        yield slice(start, start + step)


def _profile(
    variance: np.ndarray, sums: tuple[float, float, float, float] | None = None
) -> tuple[float, float, float]:
    """Σv, √(max row sum) + √(max column sum) and max v: from ``sums`` or one chunked pass."""
    total, row_max, column_max, largest = _sums(variance) if sums is None else sums
    return total, math.sqrt(row_max) + math.sqrt(column_max), largest


def _sums(variance: np.ndarray) -> tuple[float, float, float, float]:
    """Σv, max row sum, max column sum and max v, in one chunked float64 pass."""
    columns = variance.shape[1]
    column_sums = np.zeros(columns)
    row_max = total = largest = 0.0
    for chunk in _row_slices(variance.shape, CHUNK_ELEMENTS):
        block = variance[chunk]
        if block.size == 0:
            continue
        row_sums = np.sum(block, axis=1, dtype=np.float64)
        column_sums += np.sum(block, axis=0, dtype=np.float64)
        row_max = max(row_max, float(row_sums.max()))
        total += float(row_sums.sum())
        largest = max(largest, float(block.max()))
    column_max = float(column_sums.max()) if columns else 0.0
    return total, row_max, column_max, largest


def _sim_edge(scratch: np.ndarray, variance: np.ndarray, rng: np.random.Generator) -> float:
    """σ₁ of one draw N_ij ~ U(±√(3 v_ij)), written into ``scratch``."""
    for rows in _row_slices(scratch.shape, CHUNK_ELEMENTS):
        block = scratch[rows]
        rng.random(block.shape, dtype=scratch.dtype, out=block)
        scale = np.multiply(variance[rows], 3.0, dtype=scratch.dtype)
        np.sqrt(scale, out=scale)
        block *= 2.0
        block -= 1.0
        block *= scale
    return top_singular_value(scratch, rng)


def _flip_edges(
    scratch: np.ndarray,
    delta: np.ndarray,
    rng: np.random.Generator,
    draws: int,
    decided: float,
) -> float:
    """Return the largest σ₁ of S ⊙ ΔW over up to ``draws`` draws, or the first past ``decided``.

    ``decided`` is ``agreement`` × the sim edge: a flip edge beyond it makes
    the sim edge the combined one (:func:`combine_edges`) whatever the other
    draws give, since more draws can only raise the largest.
    """
    largest = 0.0
    for _ in range(draws):
        largest = max(largest, _flip_edge(scratch, delta, rng))
        if largest > decided:
            break
    return largest


def _flip_edge(scratch: np.ndarray, delta: np.ndarray, rng: np.random.Generator) -> float:
    """σ₁ of S ⊙ ΔW for random signs S, written into ``scratch`` (sign bits flipped exactly)."""
    words = _WORDS[delta.itemsize]
    sign_shift = 8 * delta.itemsize - 1
    for rows in _row_slices(delta.shape, CHUNK_ELEMENTS):
        block = delta[rows]
        bits = np.unpackbits(np.frombuffer(rng.bytes(-(-block.size // 8)), dtype=np.uint8))
        signs = bits[: block.size].astype(words).reshape(block.shape)
        np.left_shift(signs, sign_shift, out=signs)
        np.bitwise_xor(block.view(words), signs, out=scratch[rows].view(words))
    return top_singular_value(scratch, rng)


def top_singular_value(
    matrix: np.ndarray,
    rng: np.random.Generator,
    tol: float = _LANCZOS_TOL,
    max_steps: int = _LANCZOS_STEPS,
) -> float:
    """σ₁ by Golub-Kahan-Lanczos bidiagonalization with full reorthogonalization.

    Each step multiplies by the matrix and its transpose once (in its dtype,
    through SciPy's BLAS);
    the estimate is σ₁ of the small bidiagonal matrix, a lower bound that
    grows to σ₁. The run stops when it grew by less than ``tol`` (relative)
    over the last 4 steps, at the Krylov space's end or after ``max_steps``.
    On a Marchenko-Pastur bulk (the slowest case: a continuous edge) it takes
    20-40 steps and lands within 0.5 % of σ₁ (the worst seen: a stall on a
    near-double top value σ₂ ≈ σ₁, itself a fair sample of the noise's edge);
    spiked or heavy-tailed spectra converge in fewer. Dimensions below 96 get
    σ₁ by an exact SVD.

    Parameters
    ----------
    matrix : ndarray, shape (m, n), float32 or float64
    rng : numpy.random.Generator
        Draws the start vector.
    tol : float
        Relative growth over 4 steps below which the run stops.
    max_steps : int
        The most steps (products with the matrix and its transpose).

    Returns
    -------
    float
        σ̂₁ ≤ σ₁ (0 for a zero matrix).

    References
    ----------
    Golub & Kahan, "Calculating the singular values and pseudo-inverse of a
    matrix", SIAM J. Numer. Anal. B 2(2), 1965. Larsen, "Lanczos
    bidiagonalization with partial reorthogonalization", DAIMI PB-357, 1998.
    Kuijlaars, "Which eigenvalues are found by the Lanczos method?", SIAM J.
    Matrix Anal. Appl. 22(1), 2000 (convergence to a continuous spectrum's edge).
    """
    if min(matrix.shape, default=0) < _EXACT_BELOW:
        return float(exact_values(matrix)[0]) if matrix.size else 0.0
    steps = min(max_steps, min(matrix.shape))
    right = np.zeros((steps + 1, matrix.shape[1]), dtype=matrix.dtype)
    left = np.zeros((steps, matrix.shape[0]), dtype=matrix.dtype)
    start = rng.standard_normal(matrix.shape[1], dtype=matrix.dtype)
    right[0] = start / np.linalg.norm(start)
    diagonal: list[float] = []
    upper: list[float] = []
    estimates: list[float] = []
    for step in range(steps):
        column = times_vector(matrix, right[step])
        if step:
            column -= upper[-1] * left[step - 1]
            column -= times_vector(left[:step], times_vector(left[:step], column), transpose=True)
        alpha = float(np.linalg.norm(column))
        if alpha == 0.0:
            break
        left[step] = column / alpha
        row = times_vector(matrix, left[step], transpose=True) - alpha * right[step]
        kept = right[: step + 1]
        row -= times_vector(kept, times_vector(kept, row), transpose=True)
        beta = float(np.linalg.norm(row))
        diagonal.append(alpha)
        estimates.append(_bidiagonal_norm(diagonal, upper))
        if beta == 0.0 or _converged(estimates, tol):
            break
        upper.append(beta)
        right[step + 1] = row / beta
    return estimates[-1] if estimates else 0.0


def _bidiagonal_norm(diagonal: list[float], upper: list[float]) -> float:
    """σ₁ of the upper bidiagonal matrix with this diagonal and superdiagonal."""
    matrix = np.diag(diagonal) + np.diag(upper, 1)
    return float(np.linalg.svd(matrix, compute_uv=False)[0])


def _converged(estimates: list[float], tol: float) -> bool:
    """Whether σ̂₁ grew by less than ``tol`` (relative) over the last steps."""
    if len(estimates) <= _LANCZOS_WINDOW:
        return False
    return estimates[-1] - estimates[-1 - _LANCZOS_WINDOW] <= tol * estimates[-1]
