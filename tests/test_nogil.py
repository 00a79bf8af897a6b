"""The GIL-free SYRK, syevr and dsdot calls against NumPy, and their SciPy fallbacks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from svdrank.spectra import nogil

SHAPES = [(300, 200), (200, 300), (1, 5), (5, 1), (1, 1)]


def _reference_gram(matrix: np.ndarray) -> np.ndarray:
    wide = matrix.astype(np.float64)
    return wide.T @ wide if matrix.shape[0] >= matrix.shape[1] else wide @ wide.T


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_gram_lower_is_the_smaller_gram_matrix(shape, dtype, order):
    matrix = np.asarray(np.random.default_rng(0).standard_normal(shape), dtype=dtype, order=order)

    gram = nogil.gram_lower(matrix)

    reference = _reference_gram(matrix)
    assert gram.shape == reference.shape and gram.dtype == dtype and gram.flags.f_contiguous
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(np.tril(gram), np.tril(reference), rtol=rtol, atol=rtol * 10)
    assert not np.triu(gram, 1).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 2, 50, 300])
def test_eigenvalues_lower_match_numpy(dtype, size):
    matrix = np.random.default_rng(size).standard_normal((size + 7, size))
    reference = np.linalg.eigvalsh(matrix.T @ matrix)
    lower = np.asfortranarray(np.tril(matrix.T @ matrix)).astype(dtype)  # upper part zero

    values = nogil.eigenvalues_lower(lower)

    assert values.dtype == dtype
    tolerance = (1e-5 if dtype == np.float32 else 1e-12) * reference[-1]
    np.testing.assert_allclose(values, reference, atol=tolerance)


@pytest.mark.parametrize("size", [0, 1, 1000, 3_000_001])
def test_dsdot_sum_of_squares_matches_float64(size):
    values = np.random.default_rng(size).standard_normal(size).astype(np.float32)

    total = nogil.sum_of_squares_f32(values)

    assert total == pytest.approx(float(np.sum(values.astype(np.float64) ** 2)), rel=1e-7)


def test_fallbacks_give_the_same_numbers(monkeypatch):
    matrix = np.random.default_rng(0).standard_normal((120, 80)).astype(np.float32)
    direct = nogil.gram_lower(matrix)
    direct_values = nogil.eigenvalues_lower(direct.copy(order="F"))

    monkeypatch.setattr(nogil, "_SYRK", {})
    monkeypatch.setattr(nogil, "_SYEVR", {})
    monkeypatch.setattr(nogil, "_DSDOT", None)

    fallback = nogil.gram_lower(matrix)
    np.testing.assert_allclose(np.tril(fallback), np.tril(direct), rtol=1e-6)
    values = nogil.eigenvalues_lower(fallback)
    np.testing.assert_allclose(values, direct_values, rtol=1e-5, atol=1e-4 * direct_values[-1])
    assert nogil.sum_of_squares_f32(matrix) is None


@pytest.mark.timing
@pytest.mark.parametrize("call", ["syrk", "syevr"])
def test_the_calls_release_the_gil(call):
    """While the call runs in one thread, another thread goes on executing Python code."""
    matrix = np.random.default_rng(0).standard_normal((3000, 1500)).astype(np.float32)
    gram = nogil.gram_lower(matrix)
    run = {"syrk": lambda: nogil.gram_lower(matrix), "syevr": lambda: nogil.eigenvalues_lower(gram)}
    window = []
    done = threading.Event()

    def work():
        window.append(time.perf_counter())
        run[call]()
        window.append(time.perf_counter())
        done.set()

    thread = threading.Thread(target=work)
    ticks = []
    thread.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    thread.join()

    # Holding the GIL, the call would leave this thread no turn until it returns:
    # one gap as long as the call. Released, this thread ticks all along.
    inside = [window[0], *(tick for tick in ticks if window[0] < tick < window[1]), window[1]]
    longest_gap = max(np.diff(inside))
    assert longest_gap < 0.5 * (window[1] - window[0])


def test_the_routines_are_found_with_the_expected_signatures():
    assert all(nogil._SYRK.values()) and all(nogil._SYEVR.values()) and nogil._DSDOT


def test_an_unexpected_signature_or_a_missing_routine_gives_the_fallback():
    from scipy.linalg import cython_blas

    assert nogil._routine(cython_blas, "ssyrk", "void (int *, X *)") is None
    assert nogil._routine(cython_blas, "no_such_routine", "void ()") is None
