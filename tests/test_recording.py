"""Kernels that keep the engine's work: the host's spectra, and near-optimal triplets from it."""

from __future__ import annotations

import numpy as np
import pytest

from svdrank.spectra.devices import HOST
from svdrank.spectra.engines import decompose
from svdrank.spectra.factors import Sketch, sketch_svd
from svdrank.spectra.recording import RecordingKernels
from svdrank.spectra.tridiagonal import tridiagonal_eigenvalues
from svdrank.types import EngineSettings
from tests.spectra import planted, spectrum_of

NEAR_OPTIMAL = 1.01
"""A rank-r approximation from the engine's work may exceed the optimal error by 1 %."""
ROUTES = [  # spectrum, shape, expect_slow → the engine and completeness decompose reaches
    ("power-0.5", (600, 400), False, "gram", True),
    ("power-0.5", (400, 600), True, "gram", True),
    ("power-1", (600, 400), False, "randomized", False),
    ("power-2", (400, 600), False, "randomized", False),
    ("power-1", (600, 400), True, "gram", False),
    ("exponential", (400, 600), True, "gram", False),
    ("power-1", (100, 90), False, "exact", True),
]


def _matrix(kind: str, shape: tuple[int, int], dtype=np.float32) -> np.ndarray:
    return planted(shape, spectrum_of(kind, min(shape)), dtype)


def _optimal_error(matrix: np.ndarray, rank: int) -> float:
    """√(Σ_{i>r} σᵢ²) from NumPy's SVD in float64 (Eckart-Young)."""
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(sigma[rank:] ** 2)))


def _error(matrix: np.ndarray, svd) -> float:
    approximation = (svd.left.astype(np.float64) * svd.values) @ svd.right.astype(np.float64)
    return float(np.linalg.norm(matrix.astype(np.float64) - approximation))


@pytest.mark.parametrize(("kind", "shape", "expect_slow", "engine", "complete"), ROUTES)
def test_recording_kernels_give_the_host_spectrum_bit_for_bit(
    kind, shape, expect_slow, engine, complete
):
    matrix = _matrix(kind, shape)
    settings = EngineSettings(engine="auto")
    host = decompose(matrix, settings, np.random.default_rng(5), expect_slow=expect_slow)
    recording = RecordingKernels()
    kept = decompose(
        matrix, settings, np.random.default_rng(5), expect_slow=expect_slow, kernels=recording
    )
    assert (kept.engine, kept.complete) == (host.engine, host.complete) == (engine, complete)
    np.testing.assert_array_equal(kept.values, host.values)
    workings = recording.workings
    assert (workings.reduction is not None) == (engine == "gram" and complete)
    if workings.reduction is not None:
        eigenvalues = tridiagonal_eigenvalues(workings.reduction)
        np.testing.assert_array_equal(np.sqrt(np.clip(eigenvalues[::-1], 0, None)), host.values)
    if not complete:
        assert workings.sketch is not None and workings.sketch.width >= kept.k


@pytest.mark.parametrize(("kind", "shape", "expect_slow", "engine", "complete"), ROUTES[2:6])
def test_kept_sketch_gives_near_optimal_triplets(kind, shape, expect_slow, engine, complete):
    matrix = _matrix(kind, shape)
    recording = RecordingKernels()
    spectrum = decompose(
        matrix,
        EngineSettings(engine="auto"),
        np.random.default_rng(5),
        expect_slow=expect_slow,
        kernels=recording,
    )
    sketch = recording.workings.sketch
    assert sketch is not None
    rank = max(1, spectrum.k - 10)
    svd = sketch_svd(matrix, sketch, rank)
    assert svd.left.shape == (shape[0], rank) and svd.right.shape == (rank, shape[1])
    assert _error(matrix, svd) <= NEAR_OPTIMAL * _optimal_error(matrix, rank) + 1e-5
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[:rank]
    assert np.all(svd.values <= sigma * (1 + 1e-5))


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("given", [True, False])
def test_sketch_svd_of_an_exact_basis_is_the_truncated_svd(left, given):
    # A basis spanning the top 12 singular vectors exactly: the top 8 triplets are NumPy's.
    matrix = _matrix("power-1", (300, 200), np.float64)
    u, sigma, vt = np.linalg.svd(matrix, full_matrices=False)
    basis = u[:, :12] if left else vt[:12].T
    projection = None
    if given:
        projection = matrix.T @ basis if left else matrix @ basis
    svd = sketch_svd(matrix, Sketch(basis, left, projection), 8)
    np.testing.assert_allclose(svd.values, sigma[:8], rtol=1e-12)
    reference = (u[:, :8] * sigma[:8]) @ vt[:8]
    np.testing.assert_allclose((svd.left * svd.values) @ svd.right, reference, atol=1e-12)


def test_gram_that_syevr_would_rescale_keeps_no_reduction():
    matrix = _matrix("power-0.5", (600, 400)) * np.float32(1e-9)
    settings = EngineSettings(engine="gram")
    host = decompose(matrix, settings, np.random.default_rng(0), kernels=HOST)
    recording = RecordingKernels()
    kept = decompose(matrix, settings, np.random.default_rng(0), kernels=recording)
    np.testing.assert_array_equal(kept.values, host.values)
    assert recording.workings.reduction is None
