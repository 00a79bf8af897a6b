"""Extraction's numerics against NumPy's SVD: top-r vectors, balanced factors, measured error."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from svdrank.analysis.resize import core_svd, low_rank_energy, refactor_module
from svdrank.spectra.factors import (
    exact_svd,
    gram_svd,
    lora_factors,
    projected_residual_energy,
    randomized_svd,
    residual_energy,
    truncated_svd,
)

DECAYS = {
    "low-rank+noise": lambda i: np.where(i <= 6, 1.0 / i, 1e-3),
    "power-0.5": lambda i: i**-0.5,
    "power-1": lambda i: i**-1.0,
    "power-2": lambda i: i**-2.0,
    "exponential": lambda i: np.exp(-i / 8.0),
}
NEAR_OPTIMAL = 0.01
"""The error of a rank-r approximation may exceed the optimal √(Σ_{i>r} σᵢ²) by this share."""


def _matrix(shape: tuple[int, int], decay: str, dtype=np.float64, seed: int = 0) -> np.ndarray:
    """U·diag(σ)·Vᵀ with random orthonormal U, V and σ from ``decay``."""
    rng = np.random.default_rng(seed)
    k = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], k)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], k)))
    return ((u * DECAYS[decay](np.arange(1, k + 1))) @ v.T).astype(dtype)


def _optimal_error(delta: np.ndarray, rank: int) -> float:
    """√(Σ_{i>r} σᵢ²) from NumPy's SVD in float64 (Eckart-Young)."""
    values = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(values[rank:] ** 2)))


def _approximation_error(delta: np.ndarray, svd) -> float:
    approximation = (svd.left.astype(np.float64) * svd.values) @ svd.right.astype(np.float64)
    return float(np.linalg.norm(delta.astype(np.float64) - approximation))


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rank", [1, 6, 30])
def test_randomized_error_is_within_one_percent_of_optimal(decay, shape, dtype, rank):
    delta = _matrix(shape, decay, dtype)
    svd = randomized_svd(delta, rank, rng=np.random.default_rng(1))
    optimal = _optimal_error(delta, rank)
    # An absolute floor of a few ε·‖ΔW‖ where the optimum is (nearly) zero.
    floor = 50 * np.finfo(dtype).eps * np.linalg.norm(delta)
    assert _approximation_error(delta, svd) <= (1 + NEAR_OPTIMAL) * optimal + floor
    assert svd.left.dtype == dtype and svd.right.dtype == dtype
    np.testing.assert_allclose(svd.left.T @ svd.left, np.eye(rank), atol=1e-5)
    np.testing.assert_allclose(svd.right @ svd.right.T, np.eye(rank), atol=1e-5)


@pytest.mark.parametrize("decay", ["low-rank+noise", "power-0.5", "power-1"])
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rank", [6, 60])
def test_gram_error_is_within_one_percent_of_optimal(decay, shape, dtype, rank):
    # The Gram route resolves σᵢ ≥ √ε·σ₁ only: these spectra stay above it up to the rank.
    delta = _matrix(shape, decay, dtype)
    svd = gram_svd(delta, rank)
    floor = 50 * np.finfo(dtype).eps * np.linalg.norm(delta)
    assert (
        _approximation_error(delta, svd) <= (1 + NEAR_OPTIMAL) * _optimal_error(delta, rank) + floor
    )
    # G's eigenvectors are orthonormal to O(n·ε); the other side, ΔW·vᵢ/σᵢ, as far as the
    # Gram matrix resolves σᵢ·σⱼ: its rounding is ε·σ₁², so to O(ε·σ₁²/(σᵢ·σⱼ)).
    eigen, projected = (svd.right.T, svd.left) if shape[0] >= shape[1] else (svd.left, svd.right.T)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(eigen.T @ eigen, np.eye(rank), atol=min(shape) * eps)
    sigma = np.linalg.svd(delta.astype(np.float64), compute_uv=False)[:rank]
    bound = 10 * eps * sigma[0] ** 2 / np.outer(sigma, sigma)
    assert np.all(np.abs(projected.T @ projected - np.eye(rank)) <= bound)


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
def test_exact_triplets_match_numpy(decay, shape):
    delta = _matrix(shape, decay)
    rank = 5
    svd = exact_svd(delta, rank)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    np.testing.assert_allclose(svd.values, s[:rank], rtol=1e-12, atol=1e-14)
    reference = (u[:, :rank] * s[:rank]) @ vt[:rank]
    approximation = (svd.left * svd.values) @ svd.right
    np.testing.assert_allclose(approximation, reference, atol=1e-12 * s[0])


def test_randomized_values_never_exceed_the_true_ones():
    delta = _matrix((400, 250), "power-1", np.float32)
    svd = randomized_svd(delta, 12, rng=np.random.default_rng(3))
    exact = np.linalg.svd(delta.astype(np.float64), compute_uv=False)[:12]
    assert np.all(svd.values <= exact * (1 + 1e-5))
    np.testing.assert_allclose(svd.values, exact, rtol=2e-3)


@pytest.mark.parametrize(
    ("shape", "rank", "method"),
    [((300, 200), 4, "randomized"), ((300, 200), 50, "exact"), ((600, 520), 200, "gram")],
)
def test_auto_sketches_only_small_ranks(shape, rank, method):
    delta = _matrix(shape, "power-1", np.float32)
    assert truncated_svd(delta, rank, rng=np.random.default_rng(0)).method == method


@pytest.mark.parametrize("scale", [0.5, 2.0, 16.0])
def test_lora_factors_are_balanced_and_reproduce_the_truncation(scale):
    delta = _matrix((90, 60), "power-1")
    svd = exact_svd(delta, 7)
    b, a = lora_factors(svd, scale)
    assert b.shape == (90, 7) and a.shape == (7, 60)
    np.testing.assert_allclose(np.linalg.norm(b), np.linalg.norm(a), rtol=1e-12)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    np.testing.assert_allclose(scale * b @ a, (u[:, :7] * s[:7]) @ vt[:7], atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stored", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_residual_energy_is_the_direct_frobenius_norm(dtype, stored):
    rng = np.random.default_rng(5)
    delta = rng.standard_normal((70, 50)).astype(dtype)
    b = rng.standard_normal((70, 4)).astype(stored)
    a = rng.standard_normal((4, 50)).astype(stored)
    reference = np.linalg.norm(
        delta.astype(np.float64) - 1.5 * b.astype(np.float64) @ a.astype(np.float64)
    )
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(residual_energy(delta, b, a, 1.5), reference**2, rtol=tolerance)


def test_residual_of_an_exact_factorisation_is_not_lost_to_cancellation():
    # ‖ΔW‖² − ‖BA‖² would give noise of order ε·‖ΔW‖²; the direct residual is exact.
    delta = _matrix((100, 80), "low-rank+noise")
    svd = exact_svd(delta, 6)
    b, a = lora_factors(svd, 1.0)
    np.testing.assert_allclose(
        residual_energy(delta, b, a, 1.0), _optimal_error(delta, 6) ** 2, rtol=1e-6
    )


def _stored_error_energies(delta, rank, stored, scale):
    """(Error² taken without ΔW or None, error² in float64) of Gram factors cast to ``stored``."""
    svd = gram_svd(delta, rank)
    b, a = lora_factors(svd, scale)
    cast = b.astype(stored), a.astype(stored)
    total = float(np.sum(np.square(delta, dtype=np.float64)))
    estimate = projected_residual_energy(total, svd.values, (b, a), cast, scale)
    product = cast[0].astype(np.float64) @ cast[1].astype(np.float64)
    reference = float(np.sum(np.square(delta.astype(np.float64) - scale * product)))
    return estimate, reference


@pytest.mark.parametrize(
    ("decay", "rank"), [("power-0.5", 6), ("power-0.5", 60), ("power-0.5", 200), ("power-1", 30)]
)
@pytest.mark.parametrize("shape", [(600, 400), (400, 600)])
@pytest.mark.parametrize("stored", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_error_taken_without_delta_is_the_direct_frobenius_norm(decay, rank, shape, stored, scale):
    # Errors of 2-30 % of ‖ΔW‖²: float32 ΔW, factors and products agree with float64 to the
    # rounding of ‖ΔW‖² − Σσᵢ², a few 1e-7 of ‖ΔW‖² (10·ε₃₂ allowed).
    delta = _matrix(shape, decay, np.float32, seed=rank)
    estimate, reference = _stored_error_energies(delta, rank, stored, scale)
    total = float(np.sum(np.square(delta, dtype=np.float64)))
    assert estimate is not None
    assert abs(estimate - reference) <= 1e-6 * total


def test_error_taken_without_delta_counts_the_rounding_of_bf16_factors():
    # The rounding of BF16 factors is ~1e-4 of the error² here: the estimate sees it.
    delta = _matrix((600, 400), "power-0.5", np.float32)
    estimate, reference = _stored_error_energies(delta, 300, ml_dtypes.bfloat16, 1.0)
    unrounded, _ = _stored_error_energies(delta, 300, np.float32, 1.0)
    assert estimate is not None and unrounded is not None
    assert reference - unrounded > 1e-5 * reference
    np.testing.assert_allclose(estimate, reference, rtol=1e-5)


def test_error_is_not_taken_without_delta_where_it_is_tiny():
    # Below 1e-3 of ‖ΔW‖² float32 rounding would show: the caller forms the residual.
    delta = _matrix((300, 200), "exponential", np.float32)
    estimate, reference = _stored_error_energies(delta, 60, np.float32, 1.0)
    assert estimate is None
    assert reference < 1e-3 * float(np.sum(np.square(delta, dtype=np.float64)))


def test_error_is_not_taken_without_delta_where_f16_flushes_the_factors():
    # Entries ~1e-7 leave F16's range: the rounding is no longer small against the error.
    delta = _matrix((300, 200), "power-1", np.float32) * np.float32(1e-10)
    estimate, reference = _stored_error_energies(delta, 20, np.float16, 1.0)
    assert estimate is None
    assert reference > 0


def test_core_svd_gives_the_triplets_of_the_product_without_forming_it():
    rng = np.random.default_rng(7)
    b, a = rng.standard_normal((80, 10)), rng.standard_normal((10, 60))
    svd = core_svd(b, a, 0.25)
    u, s, vt = np.linalg.svd(0.25 * b @ a, full_matrices=False)
    np.testing.assert_allclose(svd.values, s[:10], rtol=1e-12)
    np.testing.assert_allclose(
        (svd.left[:, :4] * svd.values[:4]) @ svd.right[:4], (u[:, :4] * s[:4]) @ vt[:4], atol=1e-12
    )


def test_low_rank_energy_is_the_squared_norm_of_the_product():
    rng = np.random.default_rng(8)
    left, right = rng.standard_normal((50, 6)), rng.standard_normal((6, 40))
    np.testing.assert_allclose(low_rank_energy(left, right), np.linalg.norm(left @ right) ** 2)


def test_refactored_module_error_matches_numpy():
    rng = np.random.default_rng(9)
    b = rng.standard_normal((64, 8)) * np.geomspace(1, 0.01, 8)
    a = rng.standard_normal((8, 48))
    factored = refactor_module(b, a, 0.5, 3, 2.0, "F32", "m")
    update = 0.5 * b @ a
    optimal = _optimal_error(update, 3) / np.linalg.norm(update)
    stored = 2.0 * factored.b.astype(np.float64) @ factored.a.astype(np.float64)
    measured = np.linalg.norm(update - stored) / np.linalg.norm(update)
    np.testing.assert_allclose(factored.quality.optimal, optimal, rtol=1e-9)
    np.testing.assert_allclose(factored.quality.error, measured, rtol=1e-4)
    assert measured <= optimal * (1 + 1e-5)
