"""Every engine against NumPy's exact SVD on matrices with known spectra."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from svdrank.errors import NumericalError, UsageError
from svdrank.spectra.energy import rank_at
from svdrank.spectra.engines import decompose, next_k
from svdrank.spectra.kernels import (
    exact_values,
    gram_values,
    lanczos_values,
    randomized_values,
    total_energy,
)
from svdrank.types import EngineSettings
from tests.spectra import SPECTRA, TARGETS, planted, reference_ranks, spectrum_of

SHAPES = ((600, 400), (400, 600))
DTYPES = (np.float32, np.float64)
# Relative accuracy of a backward-stable SVD: a few ε of the working precision times σ₁.
VALUE_TOLERANCE = {np.float32: 2e-5, np.float64: 1e-12}


def _matrix(kind, shape, dtype):
    # A fixed seed per kind: hash() of a str changes with every process (PYTHONHASHSEED).
    return planted(shape, spectrum_of(kind, min(shape)), dtype, seed=zlib.crc32(kind.encode()))


def _ranks(matrix, engine, expect_slow=False, **settings):
    spectrum = decompose(
        matrix,
        EngineSettings(engine=engine, **settings),
        np.random.default_rng(0),
        expect_slow=expect_slow,
    )
    return [rank_at(spectrum, target) for target in TARGETS], spectrum


@pytest.mark.parametrize("engine", ["exact", "gram"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", SPECTRA)
def test_complete_engines_give_the_reference_ranks(kind, shape, dtype, engine):
    matrix = _matrix(kind, shape, dtype)

    ranks, spectrum = _ranks(matrix, engine)

    assert ranks == reference_ranks(matrix)
    assert spectrum.complete and spectrum.engine == engine


@pytest.mark.parametrize("engine", ["randomized", "krylov", "lanczos", "auto", "auto-gram-first"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", SPECTRA)
def test_truncated_engines_are_never_below_and_at_most_one_percent_above(
    kind, shape, dtype, engine
):
    matrix = _matrix(kind, shape, dtype)
    slack = max(1, int(0.01 * min(shape)))
    options = {
        "krylov": {"engine": "randomized", "krylov": True},
        "auto-gram-first": {"engine": "auto", "expect_slow": True},
    }.get(engine, {"engine": engine})

    ranks, _ = _ranks(matrix, **options)

    for rank, reference in zip(ranks, reference_ranks(matrix), strict=True):
        assert reference <= rank <= reference + slack


@pytest.mark.parametrize("krylov", [False, True])
@pytest.mark.parametrize("normalizer", ["lu", "qr", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["power-1", "exponential", "rank-7-plus-noise"])
def test_randomized_values_never_exceed_the_true_ones(kind, dtype, normalizer, krylov):
    matrix = _matrix(kind, (500, 300), dtype)
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)

    values = randomized_values(
        matrix, 40, normalizer=normalizer, rng=np.random.default_rng(1), krylov=krylov
    )

    assert values.dtype == dtype
    assert np.all(values <= sigma[:40] + VALUE_TOLERANCE[dtype] * sigma[0])
    np.testing.assert_allclose(values[:5], sigma[:5], rtol=1e-3)  # leading values: accurate too


def test_randomized_really_sketches_on_decaying_spectra():
    spectrum = decompose(
        _matrix("power-1", (600, 400), np.float32),
        EngineSettings(engine="randomized"),
        np.random.default_rng(0),
    )

    assert (spectrum.engine, spectrum.complete) == ("randomized", False)
    assert spectrum.k < 80


@pytest.mark.parametrize("expect_slow", [False, True])
def test_slow_decay_goes_to_the_complete_gram_eigensolver(expect_slow):
    matrix = _matrix("power-0.5", (600, 400), np.float32)
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)

    spectrum = decompose(
        matrix, EngineSettings(engine="auto"), np.random.default_rng(0), expect_slow=expect_slow
    )

    assert (spectrum.engine, spectrum.complete, spectrum.k) == ("gram", True, 400)
    np.testing.assert_allclose(spectrum.values**2, sigma**2, atol=2e-5 * sigma[0] ** 2)


@pytest.mark.parametrize("expect_slow", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["power-1", "power-2", "exponential", "rank-7-plus-noise"])
def test_auto_truncates_when_the_spectrum_decays(kind, shape, dtype, expect_slow):
    """Sketching ΔW, or (expecting slow decay) its Gram matrix: top values only, never above σ."""
    matrix = _matrix(kind, shape, dtype)
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)

    spectrum = decompose(
        matrix, EngineSettings(engine="auto"), np.random.default_rng(0), expect_slow=expect_slow
    )

    engine = "gram" if expect_slow else "randomized"
    assert (spectrum.engine, spectrum.complete) == (engine, False)
    assert spectrum.k < 0.2 * min(shape)
    top = sigma[: spectrum.k]
    if expect_slow:  # √λ̂ of QᵀG: the Gram route's error is absolute on σ², ε·σ₁²
        assert np.all(spectrum.values**2 - top**2 <= VALUE_TOLERANCE[dtype] * sigma[0] ** 2)
    else:
        assert np.all(spectrum.values <= top + VALUE_TOLERANCE[dtype] * sigma[0])
    np.testing.assert_allclose(spectrum.values[:5], sigma[:5], rtol=1e-3)


def test_flat_spectrum_hands_over_to_gram():
    matrix = np.random.default_rng(0).standard_normal((600, 400)).astype(np.float32)

    spectrum = decompose(matrix, EngineSettings(engine="auto"), np.random.default_rng(0))

    assert (spectrum.engine, spectrum.complete) == ("gram", True)


@pytest.mark.parametrize(
    "kernel",
    [exact_values, gram_values, lambda a: lanczos_values(a, 20, rng=np.random.default_rng(0))],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_match_numpy_to_working_precision(kernel, dtype):
    matrix = _matrix("exponential", (300, 200), dtype)
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)

    values = kernel(matrix)

    assert values.dtype == dtype
    tolerance = VALUE_TOLERANCE[dtype] * sigma[0]
    if kernel is gram_values:
        # Gram's error is absolute on σ², of order ε·σ₁² (see gram_values).
        np.testing.assert_allclose(values**2, sigma[: values.size] ** 2, atol=tolerance * sigma[0])
    else:
        np.testing.assert_allclose(values, sigma[: values.size], atol=tolerance)


@pytest.mark.parametrize("propack", [False, True])
def test_lanczos_solvers_agree_with_numpy(propack):
    matrix = _matrix("power-1", (300, 200), np.float64)
    sigma = np.linalg.svd(matrix, compute_uv=False)
    solver = "propack" if propack else "arpack"

    values = lanczos_values(matrix, 10, solver=solver, rng=np.random.default_rng(0))

    np.testing.assert_allclose(values, sigma[:10], rtol=1e-8)


@pytest.mark.parametrize("engine", ["auto", "exact", "gram", "randomized", "lanczos"])
def test_zero_update_is_rank_zero_without_division_by_zero(engine):
    spectrum = decompose(
        np.zeros((300, 400), np.float32), EngineSettings(engine=engine), np.random.default_rng(0)
    )

    assert spectrum.total_energy == 0.0
    assert [rank_at(spectrum, target) for target in TARGETS] == [0, 0, 0]


@pytest.mark.parametrize("engine", ["auto", "exact", "gram", "randomized", "lanczos"])
@pytest.mark.parametrize("shape", [(1, 50), (50, 1), (1, 1), (3, 2), (17, 300)])
def test_vectors_and_tiny_matrices(engine, shape):
    matrix = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    ranks, spectrum = _ranks(matrix, engine)

    assert ranks == reference_ranks(matrix)
    assert spectrum.complete  # tiny layers always fall back to an exact path


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_update_is_an_error_naming_the_layer(bad):
    matrix = np.ones((20, 10), np.float32)
    matrix[3, 4] = bad

    with pytest.raises(NumericalError, match=r"layers\.3\.q_proj"):
        decompose(matrix, EngineSettings(), np.random.default_rng(0), name="layers.3.q_proj")


def test_total_energy_accumulates_in_float64():
    matrix = np.full((1000, 1000), 1e-3, np.float32) + np.float32(1e-7)
    expected = 1e6 * (np.float64(np.float32(1e-3) + np.float32(1e-7))) ** 2
    naive = np.cumsum(np.square(matrix).ravel(), dtype=np.float32)[-1]

    # BLAS dsdot may round each product to float32 (≤ 2⁻²⁴ relative); the float64
    # accumulation adds nothing measurable. A float32 running sum is ~1e-2 off here.
    assert total_energy(matrix) == pytest.approx(expected, rel=1e-7)
    assert naive != pytest.approx(expected, rel=1e-4)


def test_next_k_jumps_past_the_limit_for_flat_spectra():
    flat = np.arange(1, 33, dtype=np.float64) ** -0.05
    total_flat = float(np.sum(np.arange(1, 4097, dtype=np.float64) ** -0.1))

    assert next_k(flat, total_flat, 0.95, 4096) > 0.2 * 4096


def test_next_k_predicts_where_a_power_law_reaches_the_target():
    # σᵢ = 1/i: Σ_{i>K} σᵢ² ≈ 1/K, so E(K) ≥ 0.99 needs 1/K ≤ 0.01·Σσ², i.e. K ≈ 61,
    # and next_k asks for 1.25x that.
    sigma = np.arange(1, 4097, dtype=np.float64) ** -1.0
    total = float(np.sum(sigma**2))
    needed = int(np.argmax(np.cumsum(sigma**2) >= 0.99 * total)) + 1

    proposed = next_k(sigma[:32], total, 0.99, 4096)

    assert 1.1 * needed <= proposed <= 1.4 * needed


@pytest.mark.parametrize(
    "settings",
    [
        {"engine": "magic"},
        {"normalizer": "cholesky"},
        {"max_energy": 0.0},
        {"max_energy": 1.5},
        {"oversample": -1},
        {"lanczos_solver": "lobpcg"},
    ],
)
def test_bad_settings_are_usage_errors(settings):
    with pytest.raises(UsageError):
        EngineSettings(**settings)


def test_complete_setting_routes_to_exact():
    matrix = _matrix("power-1", (600, 400), np.float32)

    spectrum = decompose(
        matrix, EngineSettings(engine="randomized", complete=True), np.random.default_rng(0)
    )

    assert (spectrum.engine, spectrum.complete, spectrum.k) == ("exact", True, 400)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_krylov_is_more_accurate_than_subspace_iteration_for_the_same_passes(dtype):
    matrix = _matrix("power-1", (800, 600), dtype)
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[:30]

    def error(krylov):
        values = randomized_values(
            matrix, 30, power_iters=2, rng=np.random.default_rng(2), krylov=krylov
        )
        return np.max(np.abs(values - sigma) / sigma)

    assert error(True) < error(False) / 5


@pytest.mark.parametrize("shape", [(5000, 700), (3, 4), (2_500_000,), (1, 3_000_000)])
def test_sum_of_squares_in_chunks_equals_float64_reference(shape):
    import ml_dtypes

    from svdrank.spectra.kernels import sum_of_squares

    values = np.random.default_rng(0).standard_normal(shape)
    for dtype, tolerance in ((np.float64, 1e-12), (np.float32, 1e-7), (ml_dtypes.bfloat16, 1e-7)):
        array = values.astype(dtype)
        expected = float(np.sum(array.astype(np.float64) ** 2))
        # float32 products may be rounded to float32 by BLAS dsdot: 2⁻²⁴ relative at most.
        assert sum_of_squares(array) == pytest.approx(expected, rel=tolerance)


def test_the_krylov_setting_reaches_the_engine_through_decompose():
    """`diff --krylov` changes the sketch `decompose` grows, and makes its values more accurate."""
    matrix = _matrix("power-1", (800, 600), np.float32)
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)

    def error(krylov):
        settings = EngineSettings(engine="randomized", power_iters=1, krylov=krylov)
        spectrum = decompose(matrix, settings, np.random.default_rng(2))
        assert spectrum.engine == "randomized" and not spectrum.complete
        return np.max(np.abs(spectrum.values - sigma[: spectrum.k]) / sigma[: spectrum.k])

    assert error(True) < 0.75 * error(False)  # measured 0.039 against 0.068
