"""Choose an engine per layer and grow truncated spectra until they hold enough energy.

``decompose`` is the one entry point the analysis uses. Truncated engines start
from a few values and grow k (the randomized sketch keeps its basis and only
adds columns) until Σσᵢ² reaches ``max_energy`` of ‖ΔW‖_F², or hand over to a
complete engine once that is cheaper; each Spectrum records what was used.
The heavy steps go through a :class:`~svdrank.spectra.devices.Kernels` object
(NumPy on the host by default, torch on a GPU), so these decisions are one
code on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from svdrank.spectra.devices import HOST, Kernels
from svdrank.spectra.kernels import check_finite
from svdrank.types import EngineSettings, Spectrum

EXACT_BELOW = 128
"""auto: layers whose smaller side is at most this go to the exact engine. Both routes take
milliseconds there and exact is the more accurate; above it, Gram's one SYRK plus a small
eigenproblem beats gesdd (a 256×2048 layer: ~3 ms against ~20 ms here)."""
FIRST_K = 32
"""Truncated engines start with this many values."""
TRUNCATED_SHARE = 0.2
"""Truncated engines hand over to a complete one once k + oversample exceeds this share of
min(m, n): past it, Gram's one SYRK plus eigensolver costs less than the sketch's passes."""


def decompose(
    delta: np.ndarray,
    settings: EngineSettings,
    rng: np.random.Generator,
    name: str = "ΔW",
    total: float | None = None,
    expect_slow: bool = False,
    threshold: float | None = None,
    kernels: Kernels = HOST,
) -> Spectrum:
    """Compute the spectrum of one layer's update by the engine the settings ask for.

    ``auto`` sends small layers (min(m, n) ≤ EXACT_BELOW) to ``exact`` and the
    rest to adaptive ``randomized``, whose first sketch doubles as a decay
    probe: when the spectrum is too flat for a sketch to pay off, the layer goes
    to ``gram``. With ``expect_slow`` it probes the Gram matrix instead.
    Truncated engines stop as soon as their values hold ``max_energy`` of
    ‖ΔW‖_F².

    Parameters
    ----------
    delta : ndarray, shape (m, n), float32 or float64
    settings : EngineSettings
    rng : numpy.random.Generator
        Drives the random sketches and Krylov start vectors.
    name : str
        The layer's name, for error messages.
    total : float, optional
        ‖ΔW‖_F² when the caller already has it (a float64 sum of squares of
        finite entries, as the analysis forms it with ΔW); computed and checked
        here otherwise.
    expect_slow : bool
        A hint for ``auto``: a similar layer (the probe of the same stack, kind
        and shape) needed its complete spectrum, so this one probably will too. The Gram matrix
        is then formed first and probed (see :func:`_gram_first`) instead of
        sketching ΔW: a cheaper probe when the hint is right, one SYRK too many
        when it is wrong. The values are equally correct either way.
    threshold : float, optional
        τ of the layer's storage noise: truncated engines also stop once the
        last value computed is at or below it (every signal value is then
        known; the rest is noise), which is often long before ``max_energy``.
    kernels : Kernels
        Where the heavy steps run (:func:`svdrank.spectra.devices.kernels_for`);
        ΔW is placed there once. Every decision here is the same on every device.

    Returns
    -------
    Spectrum

    Raises
    ------
    NumericalError
        If ΔW holds NaN or Inf.
    """
    total = check_finite(delta, name) if total is None else total
    if total == 0.0:
        return Spectrum(np.zeros(0), 0.0, complete=True, engine="zero")
    engine = settings.engine
    small = min(delta.shape) <= EXACT_BELOW
    run = _Run(kernels, kernels.place(delta), settings, rng)
    if settings.complete or engine == "exact" or (engine == "auto" and small):
        return Spectrum(_as_float64(kernels.exact_values(run.delta)), total, True, "exact")
    if engine == "gram":
        return Spectrum(_gram_values(run), total, True, "gram")
    stop = _Stop(total, settings.max_energy, threshold)
    if engine == "lanczos":
        return _adaptive_lanczos(run, stop)
    if engine == "auto" and expect_slow:
        return _gram_first(run, stop)
    return _adaptive_randomized(run, stop)


@dataclass(frozen=True)
class _Run:
    """One layer's decomposition: the kernels, ΔW placed on their device, settings, stream."""

    kernels: Kernels
    delta: Any
    settings: EngineSettings
    rng: np.random.Generator


@dataclass(frozen=True)
class _Stop:
    """When a truncated spectrum is enough: it holds ``energy`` of ``total``, or fell to τ."""

    total: float
    energy: float
    threshold: float | None

    def reached(self, values: np.ndarray) -> bool:
        """Whether the top values computed answer every question asked of the layer.

        The values must fall to τ within the first half of those computed: a
        sketch's trailing values are its least accurate (they err low), and
        the count above τ is read where the values are accurate.
        """
        if reaches(values, self.total, self.energy):
            return True
        if self.threshold is None or values.size == 0:
            return False
        return int(np.count_nonzero(values > self.threshold)) <= values.size // 2


def _as_float64(values: np.ndarray) -> np.ndarray:
    """Singular values as float64, the precision the energy sums use."""
    return np.asarray(values, dtype=np.float64)


def _gram_values(run: _Run) -> np.ndarray:
    """Every singular value from the eigenvalues of the smaller Gram matrix, as float64."""
    return _as_float64(run.kernels.gram_spectrum(run.kernels.smaller_gram(run.delta)))


def _complete_spectrum(run: _Run, total: float) -> Spectrum:
    """Compute the whole spectrum by the cheaper complete engine: exact when small, else Gram."""
    if min(run.delta.shape) <= EXACT_BELOW:
        return Spectrum(_as_float64(run.kernels.exact_values(run.delta)), total, True, "exact")
    return Spectrum(_gram_values(run), total, True, "gram")


def truncation_limit(shape: tuple[int, int]) -> int:
    """Return the largest sketch width worth using before a complete engine is cheaper."""
    return int(TRUNCATED_SHARE * min(shape))


def reaches(values: np.ndarray, total: float, energy: float) -> bool:
    """Whether Σσᵢ² (float64) holds at least ``energy`` of the total."""
    return float(np.sum(np.square(values, dtype=np.float64))) >= energy * total


def _adaptive_randomized(run: _Run, stop: _Stop) -> Spectrum:
    """Randomized values of ΔW, growing the sketch until ``stop`` is reached, else Gram."""
    delta = run.delta
    oriented = delta if delta.shape[0] >= delta.shape[1] else delta.T
    values = _grow_sketch(run, oriented, stop, truncation_limit(delta.shape))
    if values is not None:
        return Spectrum(values, stop.total, False, "randomized")
    return _complete_spectrum(run, stop.total)


def _gram_first(run: _Run, stop: _Stop) -> Spectrum:
    """Run ``auto`` on a layer expected to decay slowly: form the Gram matrix G, then decide.

    The sketch runs on G (n×n) instead of ΔW (m×n): each product costs 2n²w
    flops instead of 4mnw, and one pass of G is one pass of ΔWᵀΔW, so the same
    iterations see a squared spectrum and converge faster. The first sketch is
    the decay probe: when the top eigenvalues of G already hold ``max_energy``
    of ‖ΔW‖_F² (or do after growing k), √λ̂ is the truncated spectrum; when the
    decay is too slow, G goes to the complete eigensolver without being formed
    again. The values are singular values of QᵀG, so λ̂ᵢ ≤ λᵢ = σᵢ² as for
    the randomized engine (interlacing), up to rounding of order ε·σ₁².
    Only G's lower triangle is set (SYRK); the products read it with SYMM.
    """
    gram = run.kernels.smaller_gram(run.delta)
    eigenvalues = _grow_sketch(run, gram, stop, truncation_limit(run.delta.shape), gram=True)
    if eigenvalues is not None:
        return Spectrum(np.sqrt(eigenvalues), stop.total, False, "gram")
    return Spectrum(_as_float64(run.kernels.gram_spectrum(gram)), stop.total, True, "gram")


def _grow_sketch(
    run: _Run, matrix: Any, stop: _Stop, limit: int, gram: bool = False
) -> np.ndarray | None:
    """Top values from a sketch of ``matrix`` that grows until ``stop`` is reached.

    ``matrix`` is ΔW (tall) or, with ``gram``, the symmetric Gram matrix, whose
    singular values are σᵢ². Each step adds columns to the basis (all earlier
    work is kept) and reads the values of the projection; the step sizes come
    from :func:`next_k`. Returns the values (σ² for ``gram``) as float64, or
    None once the sketch would exceed ``limit`` columns.
    """
    kernels, settings = run.kernels, run.settings
    basis = kernels.empty_basis(matrix)
    # One product with G is a pass of ΔWᵀΔW, two of ΔW: half the iterations see as far.
    power_iters = math.ceil(settings.power_iters / 2) if gram else settings.power_iters
    k, sketched = FIRST_K, 0
    while k + settings.oversample <= limit:
        width = k + settings.oversample - sketched
        sketched += width
        basis = kernels.extend_range(
            matrix,
            basis,
            width,
            power_iters,
            settings.normalizer,
            run.rng,
            krylov=settings.krylov and not gram,
            symmetric=gram,
        )
        values = _as_float64(kernels.projected_values(matrix, basis, symmetric=gram)[:k])
        sigma = np.sqrt(values) if gram else values
        if stop.reached(sigma):
            return values
        k = next_k(sigma, stop.total, stop.energy, min(matrix.shape), stop.threshold)
    return None


def _adaptive_lanczos(run: _Run, stop: _Stop) -> Spectrum:
    """Lanczos values, restarting with a larger k until ``stop`` is reached.

    ARPACK and PROPACK keep no state between calls, so each larger k starts over.
    """
    shape = run.delta.shape
    k = FIRST_K
    while k <= truncation_limit(shape):
        solver = run.settings.lanczos_solver
        values = _as_float64(run.kernels.lanczos_values(run.delta, k, solver, run.rng))
        if stop.reached(values):
            return Spectrum(values, stop.total, False, "lanczos")
        k = next_k(values, stop.total, stop.energy, min(shape), stop.threshold)
    return _complete_spectrum(run, stop.total)


def next_k(
    values: np.ndarray, total: float, energy: float, size: int, threshold: float | None = None
) -> int:
    """Predict the next k to try: at least double, more when the decay predicts it.

    Fits σᵢ ≈ c·i^(−β) to the lower three quarters of the values computed,
    extrapolates the energy of the tail, and returns 1.25x the k at which the
    extrapolated curve reaches ``energy`` or, with a ``threshold``, falls to
    it, whichever comes first (``size`` when neither does). A slow decay thus
    jumps straight past the truncation limit to a complete engine instead of
    sketching in vain.

    Parameters
    ----------
    values : ndarray
        The k singular values computed so far, in decreasing order.
    total : float
        ‖ΔW‖_F².
    energy : float
        The share of ``total`` the values must hold.
    size : int
        min(m, n): the number of singular values there are.
    threshold : float, optional
        τ of the layer's storage noise.

    Returns
    -------
    int
        At least 2k.
    """
    k = values.size
    doubled = 2 * k
    fit = values[k // 4 :]
    if fit.size < 2 or fit[-1] <= 0.0:
        return doubled
    index = np.arange(k // 4 + 1, k + 1, dtype=np.float64)
    slope, intercept = np.polyfit(np.log(index), np.log(fit), 1)
    tail_index = np.arange(k + 1, size + 1, dtype=np.float64)
    tail = np.exp(2.0 * (intercept + slope * np.log(tail_index)))
    curve = float(np.sum(np.square(values))) + np.cumsum(tail)
    reached = np.flatnonzero(curve >= energy * total)
    if threshold is not None:
        reached = np.union1d(reached, np.flatnonzero(tail <= threshold * threshold))
    predicted = k + 1 + int(reached[0]) if reached.size else size
    return max(doubled, math.ceil(1.25 * predicted))
