"""The GIL-free SYRK, syevr and dsdot calls against NumPy, and their SciPy fallbacks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import scipy.linalg.lapack

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


def _lower_gram(size: int, dtype) -> np.ndarray:
    matrix = np.random.default_rng(size).standard_normal((size + 7, size))
    return np.asfortranarray(np.tril(matrix.T @ matrix)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 2, 50, 300])
def test_reduce_lower_is_scipys_sytrd_bit_for_bit(dtype, size):
    gram = _lower_gram(size, dtype)
    sytrd = scipy.linalg.lapack.get_lapack_funcs("sytrd", (gram,))
    reflectors, *reference, info = sytrd(gram.copy(order="F"), lower=1, lwork=4 * size + 64)
    assert info == 0

    reduced = gram.copy(order="F")
    kept, *parts = nogil.reduce_lower(reduced, 4 * size + 64)

    for part, expected in zip(parts, reference, strict=True):
        np.testing.assert_array_equal(part, expected)
    assert kept is reduced
    np.testing.assert_array_equal(np.tril(reduced), np.tril(reflectors))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [2, 50, 300])
def test_tridiagonal_eigh_is_scipys_stevd_and_keeps_its_inputs(dtype, size):
    rng = np.random.default_rng(size)
    diagonal, off_diagonal = rng.standard_normal(size).astype(dtype), rng.random(size - 1)
    off_diagonal = off_diagonal.astype(dtype)
    kept = diagonal.copy(), off_diagonal.copy()
    stevd = scipy.linalg.lapack.get_lapack_funcs("stevd", (diagonal,))
    reference_values, reference_vectors, info = stevd(diagonal, off_diagonal)
    assert info == 0

    values, vectors = nogil.tridiagonal_eigh(diagonal, off_diagonal)

    np.testing.assert_array_equal(values, reference_values)
    np.testing.assert_array_equal(vectors, reference_vectors)
    assert vectors.flags.f_contiguous
    np.testing.assert_array_equal(diagonal, kept[0])
    np.testing.assert_array_equal(off_diagonal, kept[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("view", [False, True])
def test_apply_reflectors_is_q_times_the_block(dtype, view):
    # Q from a QR's reflectors, against NumPy's product with that Q formed explicitly.
    rng = np.random.default_rng(7)
    matrix = rng.standard_normal((90, 40))
    qr, scales = scipy.linalg.lapack.dgeqrf(matrix)[:2]
    q = np.linalg.qr(matrix, mode="complete")[0]  # LAPACK's geqrf + orgqr: the same Q
    reflectors = np.asfortranarray(qr.astype(dtype))
    block = np.asfortranarray(rng.standard_normal((90, 12)).astype(dtype))
    if view:  # rows 2..n of taller arrays, as sytrd's reflectors sit in the Gram matrix
        tall = np.zeros((91, 41), dtype=dtype, order="F")
        tall[1:, :40] = reflectors
        reflectors = tall[1:, :40]
        taller = np.zeros((91, 12), dtype=dtype, order="F")
        taller[1:] = block
        block = taller[1:]
    expected = q @ block.astype(np.float64)

    product = nogil.apply_reflectors(reflectors, scales.astype(dtype), block, 16)

    assert product is block
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(product, expected, atol=tolerance * 10)


def test_fallbacks_give_the_same_numbers(monkeypatch):
    matrix = np.random.default_rng(0).standard_normal((120, 80)).astype(np.float32)
    direct = nogil.gram_lower(matrix)
    direct_values = nogil.eigenvalues_lower(direct.copy(order="F"))

    gram = _lower_gram(60, np.float32)
    lwork = 4 * 60 + 64
    reduced, *direct_parts = nogil.reduce_lower(gram.copy(order="F"), lwork)
    direct_eigh = nogil.tridiagonal_eigh(*direct_parts[:2])
    block = np.asfortranarray(direct_eigh[1][1:, :5])
    direct_applied = nogil.apply_reflectors(reduced[1:, :-1], direct_parts[2], block.copy("F"), 16)

    for table in ("_SYRK", "_SYEVR", "_SYTRD", "_STEVD", "_ORMQR"):
        monkeypatch.setattr(nogil, table, {})
    monkeypatch.setattr(nogil, "_DSDOT", None)

    again, *parts = nogil.reduce_lower(np.ascontiguousarray(gram), lwork)  # C order: copied
    np.testing.assert_array_equal(np.tril(again), np.tril(reduced))
    for part, direct_part in zip(parts, direct_parts, strict=True):
        np.testing.assert_array_equal(part, direct_part)
    eigh = nogil.tridiagonal_eigh(*parts[:2])
    np.testing.assert_array_equal(eigh[1], direct_eigh[1])
    applied = nogil.apply_reflectors(again[1:, :-1], parts[2], block.copy("F"), 16)
    np.testing.assert_array_equal(applied, direct_applied)

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
    tables = (nogil._SYRK, nogil._SYEVR, nogil._SYTRD, nogil._STEVD, nogil._ORMQR)
    assert all(all(table.values()) for table in tables) and nogil._DSDOT


def test_an_unexpected_signature_or_a_missing_routine_gives_the_fallback():
    from scipy.linalg import cython_blas

    assert nogil._routine(cython_blas, "ssyrk", "void (int *, X *)") is None
    assert nogil._routine(cython_blas, "no_such_routine", "void ()") is None
