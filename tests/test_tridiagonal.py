"""The kept tridiagonal reduction against syevr and NumPy: its eigenvalues, its top vectors."""

from __future__ import annotations

import numpy as np
import pytest

from svdrank.spectra import nogil
from svdrank.spectra.kernels import smaller_gram
from svdrank.spectra.tridiagonal import (
    syevr_scales,
    top_eigenvectors,
    tridiagonal_eigenvalues,
    tridiagonalize,
)

SHAPES = [(5, 1), (9, 2), (60, 40), (300, 257), (700, 520)]


def _gram(shape: tuple[int, int], dtype, alpha: float = 0.7, scale: float = 1.0) -> np.ndarray:
    """The lower Gram matrix of a Gaussian ΔW whose columns decay like i^-alpha."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    decay = np.arange(1, shape[1] + 1, dtype=np.float64) ** -alpha
    delta = (rng.standard_normal(shape) * decay * scale).astype(dtype)
    return smaller_gram(delta)


def _symmetric(gram: np.ndarray) -> np.ndarray:
    """The whole symmetric matrix, in float64, from its lower triangle."""
    lower = np.tril(gram).astype(np.float64)
    return lower + np.tril(lower, -1).T


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eigenvalues_are_syevr_values_bit_for_bit(shape, dtype):
    gram = _gram(shape, dtype)
    reference = nogil.eigenvalues_lower(gram.copy(order="F"))
    values = tridiagonal_eigenvalues(tridiagonalize(gram.copy(order="F")))
    assert values.dtype == reference.dtype
    np.testing.assert_array_equal(values, reference)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_eigenvectors_match_numpy_eigh(shape, dtype):
    # Backward stable: residuals and orthogonality O(n·ε·‖G‖), values to O(ε·‖G‖) absolute.
    gram = _gram(shape, dtype)
    whole = _symmetric(gram)
    exact = np.linalg.eigvalsh(whole)[::-1]
    count = max(1, shape[1] // 3)
    values, vectors = top_eigenvectors(tridiagonalize(gram.copy(order="F")), count)
    size, eps = whole.shape[0], np.finfo(dtype).eps
    assert vectors.shape == (size, count) and vectors.dtype == dtype
    np.testing.assert_allclose(values, exact[:count], rtol=0, atol=10 * eps * exact[0])
    wide = vectors.astype(np.float64)
    np.testing.assert_allclose(wide.T @ wide, np.eye(count), rtol=0, atol=size * eps)
    residual = np.linalg.norm(whole @ wide - wide * values, axis=0)
    assert np.all(residual <= size * eps * exact[0])


def test_top_eigenvectors_span_the_top_eigenspace():
    # Planted, well separated eigenvalues: the span is that of NumPy's eigenvectors.
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    planted = np.concatenate([[50.0, 20.0, 9.0, 4.0], np.linspace(1.0, 0.1, 76)])
    whole = (basis * planted) @ basis.T
    values, vectors = top_eigenvectors(tridiagonalize(np.asfortranarray(np.tril(whole))), 4)
    np.testing.assert_allclose(values, planted[:4], rtol=1e-12)
    projector = vectors @ vectors.T
    np.testing.assert_allclose(projector, basis[:, :4] @ basis[:, :4].T, atol=1e-12)


@pytest.mark.parametrize(("scale", "scaled"), [(1.0, False), (1e-10, True), (1e6, True)])
def test_syevr_scales_exactly_out_of_its_range(scale, scaled):
    # float32: syevr rescales a matrix whose largest entry is below 2^-51.5 or above 2^31.5.
    assert syevr_scales(_gram((60, 40), np.float32, scale=scale)) is scaled
