"""The signal rank of a layer and the energy of its clean update, read from a spectrum.

Given τ from the storage noise floor (:mod:`svdrank.spectra.noise`), the
signal rank r_s = #{σᵢ > τ} counts the directions that stand above the
rounding noise (Weyl: never more than the update's rank when τ ≥ ‖N‖₂).
The clean update's energy is ‖ΔW‖_F² less the noise energy N̂, which spreads
evenly over the q = min(m, n) directions, so the k-th direction carries
σ_k² − N̂/q of clean energy. :func:`clean_spectrum` turns a layer's spectrum
into those clean values, so every rank rule, budget and check reads the clean
update the same way it reads a raw one.

NumPy only: ``recommend``, ``check`` and ``plot`` use this without the engines.
"""

from __future__ import annotations

import numpy as np

from svdrank.spectra.energy import check_target
from svdrank.types import NOISY_SHARE, SUB_ULP_SHARE, LayerResult, Spectrum


def signal_rank(values: np.ndarray, threshold: float) -> int:
    """Count the singular values above the threshold: #{σᵢ > τ}.

    With τ ≥ ‖N‖₂ this never exceeds the rank of the update (Weyl). A truncated
    spectrum whose last value is above τ gives a lower bound.

    Examples
    --------
    >>> signal_rank(np.array([5.0, 2.0, 1.0]), 1.5)
    2
    """
    return int(np.count_nonzero(values > threshold))


def clean_noise_energy(
    values: np.ndarray, total: float, noise_energy: float, signal_rank: int
) -> float:
    """N̂ = min(Σv, ‖ΔW‖_F² − Σ_{i≤r_s} σᵢ²), never negative (float64 sums).

    The energy outside the signal directions bounds the noise's share from
    above, which matters when the update is below one ulp and the model's Σv
    overstates.

    Examples
    --------
    >>> clean_noise_energy(np.array([3.0, 1.0]), 12.0, 5.0, 1)
    3.0
    """
    signal = float(np.sum(np.square(values[:signal_rank], dtype=np.float64)))
    return max(0.0, min(float(noise_energy), float(total) - signal))


def clean_gains(values: np.ndarray, noise: float, size: int, signal_rank: int) -> np.ndarray:
    """Clean energy each rank adds: σ_k² − N̂/q for k ≤ r_s, as float64.

    Storage noise spreads evenly over the q = min(m, n) directions, so each
    kept direction carries N̂/q of it. A budget allocator spends ranks on the
    largest gains and never past r_s.

    Examples
    --------
    >>> clean_gains(np.array([3.0, 2.0, 1.0]), 4.0, 4, 2)
    array([8., 3.])
    """
    return np.square(values[:signal_rank], dtype=np.float64) - float(noise) / size


def clean_rank(
    values: np.ndarray, total: float, noise: float, size: int, energy: float, signal_rank: int
) -> int:
    """Smallest k ≤ r_s whose clean gains reach ``energy`` of the clean update.

    Σ_{i≤k} (σᵢ² − N̂/q) ≥ E · (‖ΔW‖_F² − N̂), summed in float64; r_s when no k
    reaches it, 0 when r_s = 0.

    Parameters
    ----------
    values : ndarray, shape (k,)
        σ₁ ≥ σ₂ ≥ …, at least ``signal_rank`` of them.
    total : float
        ‖ΔW‖_F².
    noise : float
        N̂ from :func:`clean_noise_energy`.
    size : int
        q = min(m, n).
    energy : float
        Target share E in (0, 1].
    signal_rank : int
        r_s from :func:`signal_rank`.

    Returns
    -------
    int

    Raises
    ------
    UsageError
        If ``energy`` is outside (0, 1].

    Examples
    --------
    >>> clean_rank(np.array([3.0, 2.0, 1.0]), 18.0, 4.0, 4, 0.75, 3)
    2
    """
    check_target(energy)
    if signal_rank <= 0:
        return 0
    reached = np.cumsum(clean_gains(values, noise, size, signal_rank))
    hits = np.flatnonzero(reached >= energy * (float(total) - float(noise)))
    return int(hits[0]) + 1 if hits.size else signal_rank


def clean_spectrum(layer: LayerResult) -> Spectrum:
    """Make the spectrum of a layer's clean update: what rank rules read with noise on.

    Values √(σ_k² − N̂/q) for k ≤ r_s (negative gains clipped to 0), total
    ‖ΔW‖_F² − N̂, marked ``noise_limited`` so that no rank goes past r_s: an
    energy target the signal directions do not reach gives r_s. A layer
    without a noise floor (F32 inputs, adapters, ``--noise off``) keeps its
    spectrum.

    Parameters
    ----------
    layer : LayerResult

    Returns
    -------
    Spectrum

    Notes
    -----
    With σ = (5, 4, 0.5), ‖ΔW‖² = 41.5, τ = 1 and a modelled noise energy of
    0.4 on q = 4 directions: r_s = 2, N̂ = 0.4, so the clean values are
    √(25 − 0.1) and √(16 − 0.1) out of a clean total of 41.1.
    """
    spectrum, noise = layer.spectrum, layer.noise
    if noise is None or spectrum.total_energy == 0.0:
        return spectrum
    values = spectrum.values
    rank = noise.signal_rank
    removed = clean_noise_energy(values, spectrum.total_energy, noise.noise_energy, rank)
    gains = clean_gains(values, removed, min(layer.shape), rank)
    return Spectrum(
        np.sqrt(np.maximum(gains, 0.0)),
        spectrum.total_energy - removed,
        complete=False,
        engine=spectrum.engine,
        noise_limited=True,
    )


def below_threshold_share(layer: LayerResult) -> float | None:
    """Measure the share of ‖ΔW‖_F² outside the signal directions; None without a floor."""
    spectrum, noise = layer.spectrum, layer.noise
    if noise is None:
        return None
    if spectrum.total_energy == 0.0:
        return 0.0
    signal = float(np.sum(np.square(spectrum.values[: noise.signal_rank], dtype=np.float64)))
    return max(0.0, 1.0 - signal / spectrum.total_energy)


def noise_flags(layer: LayerResult) -> tuple[str, ...]:
    """Flag what the storage noise does to a layer's answer.

    ``noisy``: more than 10 % of ‖ΔW‖_F² lies below τ; ``sub-ulp``: more than
    half the entries did not change; ``unresolved``: ΔW ≠ 0 but no singular
    value stands above τ (the file cannot resolve this layer's update). A
    layer whose stored weights did not change at all has no flag.
    """
    noise = layer.noise
    if noise is None or layer.spectrum.total_energy == 0.0:
        return ()
    share = below_threshold_share(layer) or 0.0
    flags = []
    if share > NOISY_SHARE:
        flags.append("noisy")
    if noise.unchanged > SUB_ULP_SHARE:
        flags.append("sub-ulp")
    if noise.signal_rank == 0 and layer.spectrum.total_energy > 0.0:
        flags.append("unresolved")
    return tuple(flags)
