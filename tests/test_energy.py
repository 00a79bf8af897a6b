"""Energy curves and ranks: hand-worked cases and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from svdrank.errors import UsageError
from svdrank.spectra.energy import (
    effective_rank,
    energy_curve,
    rank_at,
    rank_by_sv_ratio,
    rank_by_threshold,
    retained_energy,
    stable_rank,
    sv_ratio,
)
from svdrank.spectra.engines import decompose
from svdrank.types import EngineSettings, Spectrum


def _spectrum(values, complete=True, total=None):
    values = np.asarray(values, dtype=np.float64)
    energy = float(np.sum(values**2)) if total is None else total
    return Spectrum(values, energy, complete, "test")


# σ = (4, 2, 1, 1): σ² = (16, 4, 1, 1), total 22; E = 16/22, 20/22, 21/22, 1.
HAND = _spectrum([4.0, 2.0, 1.0, 1.0])


def test_fro_curve_by_hand():
    np.testing.assert_allclose(energy_curve(HAND), [16 / 22, 20 / 22, 21 / 22, 1.0])


def test_nuclear_curve_by_hand():
    np.testing.assert_allclose(energy_curve(HAND, "nuclear"), [4 / 8, 6 / 8, 7 / 8, 1.0])


@pytest.mark.parametrize(
    ("target", "metric", "rank"),
    [
        (0.7, "fro", 1),
        (0.85, "fro", 2),
        (0.909, "fro", 2),
        (0.95, "fro", 3),
        (1.0, "fro", 4),
        (0.5, "nuclear", 1),
        (0.85, "nuclear", 3),
        (0.9, "nuclear", 4),
    ],
)
def test_rank_at_by_hand(target, metric, rank):
    assert rank_at(HAND, target, metric) == rank


def test_relative_error_of_best_rank_k_is_sqrt_of_lost_energy():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((30, 20))
    u, sigma, vt = np.linalg.svd(matrix, full_matrices=False)
    spectrum = _spectrum(sigma)
    for k in (1, 5, 12):
        best = (u[:, :k] * sigma[:k]) @ vt[:k]
        error = np.linalg.norm(matrix - best) / np.linalg.norm(matrix)
        assert error == pytest.approx(math.sqrt(1 - retained_energy(spectrum, k)), rel=1e-9)


def test_truncated_curve_uses_the_exact_total_and_is_a_lower_bound():
    truncated = _spectrum([4.0, 2.0], complete=False, total=22.0)

    np.testing.assert_allclose(energy_curve(truncated), [16 / 22, 20 / 22])
    assert rank_at(truncated, 0.9) == 2
    with pytest.raises(UsageError, match=r"--max-energy 0\.95"):
        rank_at(truncated, 0.95)
    with pytest.raises(UsageError, match="nuclear"):
        energy_curve(truncated, "nuclear")


@pytest.mark.parametrize("target", [0.0, -0.1, 1.01, float("nan")])
def test_target_outside_zero_one_is_a_usage_error(target):
    with pytest.raises(UsageError, match=r"\(0, 1\]"):
        rank_at(HAND, target)


def test_stable_effective_rank_and_sv_ratio_by_hand():
    assert stable_rank(HAND) == pytest.approx(22 / 16)
    p = np.array([4, 2, 1, 1]) / 8
    assert effective_rank(HAND) == pytest.approx(math.exp(-np.sum(p * np.log(p))))
    assert sv_ratio(HAND, 3) == pytest.approx(4.0)
    assert effective_rank(_spectrum([4.0], complete=False, total=22.0)) is None


def test_sv_ratio_and_threshold_ranks_by_hand():
    assert rank_by_sv_ratio(HAND, 2.0) == 2  # σ ≥ 4/2
    assert rank_by_sv_ratio(HAND, 4.0) == 4  # σ ≥ 1
    assert rank_by_threshold(HAND, 1.5) == 2
    with pytest.raises(UsageError, match="below the 2 values"):
        rank_by_sv_ratio(_spectrum([4.0, 2.0], complete=False, total=22.0), 4.0)


def test_zero_spectrum_has_rank_zero_everywhere():
    zero = Spectrum(np.zeros(0), 0.0, True, "zero")
    assert rank_at(zero, 0.95) == 0
    assert rank_by_sv_ratio(zero, 10.0) == rank_by_threshold(zero, 1e-3) == 0
    assert stable_rank(zero) == 0.0
    assert retained_energy(zero, 0) == 1.0


small_matrices = arrays(
    np.float64,
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    elements=st.floats(-100, 100, allow_nan=False, width=64),
)
targets = st.floats(0.01, 1.0)


@settings(max_examples=150, deadline=None)
@given(small_matrices, targets, targets)
def test_rank_is_monotone_in_the_target_and_bounded(matrix, first, second):
    spectrum = decompose(matrix, EngineSettings(engine="exact"), np.random.default_rng(0))
    low, high = sorted((first, second))

    assert 0 <= rank_at(spectrum, low) <= rank_at(spectrum, high) <= min(matrix.shape)


@settings(max_examples=150, deadline=None)
@given(small_matrices, targets, st.integers(-20, 20))
def test_rank_is_invariant_to_scaling_the_update(matrix, target, exponent):
    # A power of two scales every floating-point operation exactly, so the
    # invariance must hold to the bit, not only approximately, as long as nothing
    # underflows: squares of entries below ~1e-154 are subnormal or zero.
    nonzero = np.abs(matrix[matrix != 0])
    assume(nonzero.size == 0 or nonzero.min() > 1e-100)
    scale = 2.0**exponent
    engine = EngineSettings(engine="exact")
    spectrum = decompose(matrix, engine, np.random.default_rng(0))
    scaled = decompose(matrix * scale, engine, np.random.default_rng(0))

    assert rank_at(scaled, target) == rank_at(spectrum, target)


@settings(max_examples=150, deadline=None)
@given(arrays(np.float64, st.integers(1, 30), elements=st.floats(0, 1e3)), targets)
def test_curve_is_nondecreasing_and_ends_at_one(values, target):
    spectrum = _spectrum(np.sort(values)[::-1])
    curve = energy_curve(spectrum)

    if spectrum.total_energy == 0.0:
        assert rank_at(spectrum, target) == 0
        return
    assert np.all(np.diff(curve) >= 0)
    assert curve[-1] == 1.0
    assert 1 <= rank_at(spectrum, target) <= values.size
