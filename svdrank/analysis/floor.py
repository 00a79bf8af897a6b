"""One layer's spectrum with its storage noise floor: bounds first, the full estimate when needed.

The full noise floor (:func:`svdrank.spectra.noise.noise_floor`: simulated and
sign-flip draws, each a Lanczos run over an m×n matrix) costs several times
what the spectrum of a fast-decaying layer does. Layers whose noise may hold
a real share of ‖ΔW‖² (light fine-tunes) get it first, and their engines stop
once a value falls to τ. The others rarely need it: bounds read from the
stored values' squares bracket τ within a factor of a few
(:func:`svdrank.spectra.noise.threshold_bounds`), and when no computed
singular value falls inside the bracket, or the ranks the presets give do not
depend on where τ (and the noise energy) lie in it, the bracket answers. Where
the storage model may overstate the noise (updates below one ulp in many
entries, heavy tails or a "super weight" setting the edge) the bracket has no
low end. When the bracket from the squares cannot answer, the exact variance
(one more pass over the stored layer) brackets τ about twice as tightly; only
layers that one cannot answer either get the full estimate, from the same
variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from svdrank.analysis.delta import FormedDelta, Rounding, layer_variance
from svdrank.spectra.devices import HOST, Kernels
from svdrank.spectra.engines import decompose
from svdrank.spectra.noise import (
    NoiseFloor,
    ProfileBounds,
    entry_dominates,
    noise_floor,
    threshold_bounds,
    variance_profile,
)
from svdrank.spectra.signal import clean_noise_energy, clean_rank, signal_rank
from svdrank.types import AnalysisSettings, Layer, LayerNoise, Spectrum

NOISY_ENERGY = 0.01
"""Layers whose noise energy may reach this share of ‖ΔW‖_F² get the full floor before
their spectrum: the noise may decide their ranks, and τ lets the engines stop early."""
MODEL_UNCHANGED = 0.10
"""With more than this share of unchanged entries the update is below one ulp in places,
where the storage model overstates the noise: τ's bracket then has no low end."""
DECIDING_TARGETS = (0.85, 0.90, 0.95)
"""The preset energies whose noise-aware ranks must not depend on τ within its bracket for
the bracket to stand in for the full estimate."""


@dataclass(frozen=True)
class _Bracket:
    """τ known to lie in [low, high], and the noise energy in [least, energy]."""

    low: float
    high: float
    least: float
    energy: float


def spectrum_with_noise(
    layer: Layer,
    formed: FormedDelta,
    settings: AnalysisSettings,
    index: int,
    expect_slow: bool = False,
    kernels: Kernels = HOST,
) -> tuple[Spectrum, LayerNoise | None]:
    """Decompose one layer's update and, when its inputs were rounded, set its noise floor.

    The engine's random stream is ``[seed, index]`` and the floor's
    ``[seed, index, 1]``, so a layer's spectrum does not depend on whether a
    floor was estimated, and neither depends on the number of workers.
    Truncated engines stop once a value falls below the floor (the bracket's
    low end, or τ itself when the full floor came first).

    Parameters
    ----------
    layer : Layer
    formed : FormedDelta
        ΔW with its rounding (None: no floor, the spectrum as without noise).
    settings : AnalysisSettings
    index : int
        The layer's position in the analysis.
    expect_slow : bool
        The ``auto`` engine's hint (see :func:`svdrank.spectra.engines.decompose`).
    kernels : Kernels
        Where the spectrum is computed; the noise floor is computed on the host
        (the full estimate from a host copy of ΔW when it was formed on a device).

    Returns
    -------
    tuple
        The Spectrum and the LayerNoise (None without a rounding).
    """
    rng = np.random.default_rng([settings.seed, index])
    rounding = formed.rounding

    def spectrum(threshold: float | None) -> Spectrum:
        return decompose(
            formed.delta,
            settings.engine,
            rng,
            layer.name,
            formed.total_energy,
            expect_slow,
            threshold,
            kernels,
        )

    if rounding is None:
        return spectrum(None), None
    floor_rng = np.random.default_rng([settings.seed, index, 1])
    noisy = rounding.bounds.energy > NOISY_ENERGY * formed.total_energy > 0.0
    if noisy or (settings.noise == "full" and formed.total_energy > 0.0):
        floor = _full_floor(layer, formed, rounding, floor_rng)
        found = spectrum(floor.threshold)
        return found, _estimated(rounding, floor, found, formed.size)
    bracket = _bracket(rounding, rounding.bounds, layer.shape)
    found = spectrum(bracket.low or None)
    if _bracket_answers(found, bracket, min(layer.shape)):
        return found, _bounded(rounding, bracket, found, formed.size)
    variance = layer_variance(layer, rounding.grids)
    profile = variance_profile(variance, rounding.roundings)
    exact = _bracket(rounding, profile, layer.shape)
    if _bracket_answers(found, exact, min(layer.shape)):
        return found, _bounded(rounding, exact, found, formed.size)
    floor = noise_floor(
        formed.host_delta(), variance, floor_rng, roundings=rounding.roundings, profile=profile
    )
    return found, _estimated(rounding, floor, found, formed.size)


def _bracket(rounding: Rounding, bounds: ProfileBounds, shape: tuple[int, int]) -> _Bracket:
    """Bracket τ and the noise energy from a profile (bounds from squares, or exact sums).

    Where the storage model may overstate the noise (many unchanged entries,
    or single entries setting the edge), the actual noise can be smaller than
    any bound from the stored values: the bracket's low ends are then 0.
    """
    low, high = threshold_bounds(bounds, shape)
    unchanged = rounding.unchanged > MODEL_UNCHANGED * shape[0] * shape[1]
    if unchanged or entry_dominates(bounds):
        return _Bracket(0.0, high, 0.0, bounds.energy)
    return _Bracket(low, high, bounds.least_energy, bounds.energy)


def _full_floor(
    layer: Layer, formed: FormedDelta, rounding: Rounding, rng: np.random.Generator
) -> NoiseFloor:
    """Estimate τ from simulated and sign-flip draws (re-reads the layer for its variance)."""
    variance = layer_variance(layer, rounding.grids)
    return noise_floor(formed.host_delta(), variance, rng, roundings=rounding.roundings)


def _bracket_answers(spectrum: Spectrum, bracket: _Bracket, size: int) -> bool:
    """Whether τ's bracket decides everything the floor is for, so no estimate is needed.

    It does when no computed value lies inside the bracket (the signal rank
    is then the same for every τ in it), or when the noise-aware ranks of the
    presets come out the same at both ends of the bracket and below its
    signal ranks.
    """
    values, total = spectrum.values, spectrum.total_energy
    fewest, most = signal_rank(values, bracket.high), signal_rank(values, bracket.low)
    if fewest == most:
        return True
    noise = (
        clean_noise_energy(values, total, bracket.least, most),
        clean_noise_energy(values, total, bracket.energy, fewest),
    )
    for target in DECIDING_TARGETS:
        ranks = {clean_rank(values, total, energy, size, target, fewest) for energy in noise}
        if len(ranks) > 1 or max(ranks) >= fewest:
            return False
    return True


def _bounded(
    rounding: Rounding, bracket: _Bracket, spectrum: Spectrum, size: int
) -> LayerNoise:
    """Record a floor set from the bracket: τ is its high end, r_s a lower bound unless exact."""
    values = spectrum.values
    exact = spectrum.complete or values.size == 0 or bool(values[-1] <= bracket.low)
    fewest = signal_rank(values, bracket.high)
    return LayerNoise(
        grid=rounding.grids[1],
        base_grid=rounding.grids[0],
        roundings=rounding.roundings,
        noise_energy=bracket.energy,
        threshold=bracket.high,
        signal_rank=fewest,
        signal_rank_exact=exact and fewest == signal_rank(values, bracket.low),
        unchanged=rounding.unchanged / size if size else 0.0,
        estimate="bound",
        threshold_low=bracket.low,
    )


def _estimated(rounding: Rounding, floor: NoiseFloor, spectrum: Spectrum, size: int) -> LayerNoise:
    """Record a floor estimated from draws: r_s exact once a value fell to τ."""
    values, threshold = spectrum.values, floor.threshold
    exact = spectrum.complete or values.size == 0 or bool(values[-1] <= threshold)
    return LayerNoise(
        grid=rounding.grids[1],
        base_grid=rounding.grids[0],
        roundings=rounding.roundings,
        noise_energy=floor.noise_energy,
        threshold=threshold,
        signal_rank=signal_rank(values, threshold),
        signal_rank_exact=exact,
        unchanged=rounding.unchanged / size if size else 0.0,
        estimate="draws",
        profile_bound=floor.profile_bound,
        max_entry=floor.max_entry,
        sim_edge=floor.sim_edge,
        flip_edge=floor.flip_edge,
        edge=floor.edge,
    )
