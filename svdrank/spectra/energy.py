"""Energy curves and the ranks read from them.

Two metrics (DESIGN.md, Vocabulary):

- ``fro`` (default): E(k) = Σ_{i≤k} σᵢ² / ‖ΔW‖_F², the share of the update a
  rank-k LoRA keeps; the relative error of the best rank-k approximation is
  √(1 − E(k)) (Eckart-Young).
- ``nuclear``: E(k) = Σ_{i≤k} σᵢ / Σσᵢ, the classic SVD tutorials' definition.
  Its denominator needs every singular value, so it needs a complete spectrum.

All sums accumulate in float64. A truncated spectrum's curve is a lower bound
of the true curve, so a rank read from it is never below the true rank.
"""

from __future__ import annotations

import math

import numpy as np

from svdrank.errors import UsageError
from svdrank.types import METRICS, Spectrum, check_choice


def energy_curve(spectrum: Spectrum, metric: str = "fro") -> np.ndarray:
    """E(1), …, E(k) for the values computed, as float64 in [0, 1].

    For a complete spectrum the curve is normalised by its own sum, so E of the
    full rank is exactly 1 (‖ΔW‖_F² and Σσᵢ² agree to rounding).

    Raises
    ------
    UsageError
        For ``nuclear`` on a truncated spectrum, or an unknown metric.
    """
    check_choice(metric, METRICS, "metric")
    if spectrum.total_energy == 0.0:
        return np.zeros(0)
    if metric == "nuclear":
        if not spectrum.complete:
            raise UsageError(
                "the nuclear metric needs complete spectra; run `svdrank diff --metric nuclear`"
            )
        sums = np.cumsum(spectrum.values, dtype=np.float64)
        return sums / sums[-1]
    sums = np.cumsum(np.square(spectrum.values, dtype=np.float64))
    denominator = sums[-1] if spectrum.complete else spectrum.total_energy
    return np.minimum(sums / denominator, 1.0)


def rank_at(spectrum: Spectrum, target: float, metric: str = "fro") -> int:
    """Find the smallest rank k whose energy E(k) reaches ``target``.

    Parameters
    ----------
    spectrum : Spectrum
    target : float
        The share of the update to keep, in (0, 1].
    metric : {"fro", "nuclear"}
        E(k) = Σᵢ≤ₖ σᵢ² / ‖ΔW‖_F² (``fro``) or Σᵢ≤ₖ σᵢ / Σσ (``nuclear``, complete
        spectra only).

    Returns
    -------
    int
        k, or 0 for an update that is exactly zero.

    Raises
    ------
    UsageError
        If the target is outside (0, 1], or a truncated spectrum does not
        reach it (the analysis was run with a lower ``--max-energy``).
    """
    check_target(target)
    curve = energy_curve(spectrum, metric)
    if curve.size == 0:
        return 0
    index = int(np.searchsorted(curve, target, side="left"))
    if index == curve.size:
        if spectrum.complete or spectrum.noise_limited:
            return curve.size
        raise UsageError(
            f"energy {target} is above what the analysis computed ({curve[-1]:.4f}); "
            f"run `svdrank diff --max-energy {target}`"
        )
    return index + 1


def retained_energy(spectrum: Spectrum, rank: int, metric: str = "fro") -> float:
    """E(rank): the share of the update a rank-``rank`` LoRA keeps.

    For a truncated spectrum and a rank beyond the values computed, this is
    E(k), a lower bound.
    """
    if spectrum.total_energy == 0.0:
        return 1.0
    curve = energy_curve(spectrum, metric)
    if rank <= 0 or curve.size == 0:
        return 0.0
    return float(curve[min(rank, curve.size) - 1])


def check_target(target: float) -> None:
    """Check that an energy target lies in (0, 1].

    Raises
    ------
    UsageError
        If it does not, or is not a number.
    """
    if not (isinstance(target, int | float) and 0.0 < target <= 1.0):
        raise UsageError(f"energy target must be in (0, 1], got {target}")


def stable_rank(spectrum: Spectrum) -> float:
    """‖ΔW‖_F² / σ₁²: how many directions the update spreads over (0 for a zero update)."""
    if spectrum.total_energy == 0.0:
        return 0.0
    return spectrum.total_energy / float(spectrum.values[0]) ** 2


def effective_rank(spectrum: Spectrum) -> float | None:
    """exp(entropy of σᵢ / Σσ) (Roy & Vetterli, 2007); None for a truncated spectrum."""
    if spectrum.total_energy == 0.0:
        return 0.0
    if not spectrum.complete:
        return None
    weights = spectrum.values[spectrum.values > 0] / np.sum(spectrum.values, dtype=np.float64)
    return float(math.exp(-np.sum(weights * np.log(weights))))


def sv_ratio(spectrum: Spectrum, k: int) -> float:
    """σ₁ / σ_k, kohya's ``sv_ratio`` (inf when σ_k is 0)."""
    sigma_k = float(spectrum.values[k - 1])
    return math.inf if sigma_k == 0.0 else float(spectrum.values[0]) / sigma_k


def rank_above(spectrum: Spectrum, floor: float, what: str) -> int:
    """How many σᵢ are ≥ ``floor`` (never more than a noise-limited spectrum's k).

    Raises
    ------
    UsageError
        When a truncated spectrum stops above the floor, so the count is unknown.
    """
    count = int(np.count_nonzero(spectrum.values >= floor))
    if count == spectrum.k and not (spectrum.complete or spectrum.noise_limited):
        raise UsageError(
            f"{what} reaches below the {spectrum.k} values the analysis computed; "
            "run `svdrank diff` with --engine exact or a higher --max-energy"
        )
    return count


def check_sv_ratio(ratio: float) -> None:
    """Refuse an ``sv_ratio`` that is not a finite number ≥ 1 (one line, naming the option)."""
    if not (math.isfinite(ratio) and ratio >= 1.0):
        raise UsageError(f"--sv-ratio must be a finite number ≥ 1, got {ratio}")


def check_threshold(threshold: float) -> None:
    """Refuse a σ threshold that is not a finite number > 0 (one line, naming the option)."""
    if not (math.isfinite(threshold) and threshold > 0.0):
        raise UsageError(f"--threshold must be a finite number > 0, got {threshold}")


def rank_by_sv_ratio(spectrum: Spectrum, ratio: float) -> int:
    """Count the σᵢ ≥ σ₁ / ratio (kohya's ``sv_ratio`` mode).

    Parameters
    ----------
    spectrum : Spectrum
    ratio : float
        At least 1.

    Returns
    -------
    int
        The count; 0 for an update that is exactly zero.

    Raises
    ------
    UsageError
        If ``ratio`` < 1, or a truncated spectrum stops above σ₁ / ratio.
    """
    check_sv_ratio(ratio)
    if spectrum.total_energy == 0.0 or spectrum.k == 0:
        return 0
    return rank_above(spectrum, float(spectrum.values[0]) / ratio, f"--sv-ratio {ratio}")


def rank_by_threshold(spectrum: Spectrum, threshold: float) -> int:
    """Count the σᵢ ≥ threshold (LyCORIS' absolute threshold mode).

    Parameters
    ----------
    spectrum : Spectrum
    threshold : float
        Greater than 0.

    Returns
    -------
    int
        The count; 0 for an update that is exactly zero.

    Raises
    ------
    UsageError
        If ``threshold`` ≤ 0, or a truncated spectrum stops above it.
    """
    check_threshold(threshold)
    if spectrum.total_energy == 0.0:
        return 0
    return rank_above(spectrum, threshold, f"--threshold {threshold}")
