"""Storage rounding noise: ulps against brute force, null cases, Weyl's bounds, clean ranks.

References are independent of the code under test: ulps from enumerating every
code of a format (or ``np.nextafter``), noise norms and singular values from
NumPy's SVD of matrices whose noise part the test built itself.
"""

from __future__ import annotations

import math
from collections import Counter

import ml_dtypes
import numpy as np
import pytest

from svdrank.errors import UsageError
from svdrank.spectra import noise, signal

SMALL_FORMATS = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
FLOAT32 = np.finfo(np.float32)


# --- rounding_variance against brute-force ulps -------------------------------------------


def _every_finite_value(dtype) -> np.ndarray:
    """Every finite value of a format of at most 16 bits, by enumerating its codes."""
    itemsize = np.dtype(dtype).itemsize
    values = np.arange(1 << (8 * itemsize), dtype=np.uint64).astype(WORDS[itemsize]).view(dtype)
    with np.errstate(invalid="ignore"):
        return values[np.isfinite(values.astype(np.float64))]


def _spacing_away_from_zero(values: np.ndarray, grid_values: np.ndarray) -> np.ndarray:
    """Distance from |x| to the next larger value of the grid (to the previous at the top)."""
    magnitudes = np.unique(np.abs(grid_values.astype(np.float64)))
    absolute = np.abs(values.astype(np.float64))
    index = np.searchsorted(magnitudes, absolute)
    above = magnitudes[np.minimum(index + 1, magnitudes.size - 1)] - absolute
    below = absolute - magnitudes[np.maximum(index - 1, 0)]
    return np.where(index + 1 < magnitudes.size, above, below)


def _assert_variance_is(variance: np.ndarray, ulp: np.ndarray) -> None:
    with np.errstate(over="ignore"):
        expected = ulp**2 / 12.0
    # u²/12 of the widest formats' extremes lies outside float32's range.
    representable = (expected >= FLOAT32.tiny) & (expected <= FLOAT32.max)
    assert np.count_nonzero(representable) > 200
    np.testing.assert_array_equal(
        variance[representable], expected[representable].astype(np.float32)
    )
    # Outside float32's normal range the variance saturates or flushes, never inf or NaN.
    assert np.all(np.isfinite(variance)) and np.all(variance >= 0)
    assert np.all(variance[expected > FLOAT32.max] == FLOAT32.max)
    assert np.all(variance[expected < FLOAT32.tiny] <= FLOAT32.tiny)


@pytest.mark.parametrize("grid", sorted(SMALL_FORMATS))
def test_rounding_variance_is_the_ulp_of_every_code(grid):
    values = _every_finite_value(SMALL_FORMATS[grid])
    ulp = _spacing_away_from_zero(values, values)
    _assert_variance_is(noise.rounding_variance(values, grid), ulp)


def _interesting_wide_values(dtype, rng) -> np.ndarray:
    """Random words of a wide float format plus zeros, powers of two, subnormals and extremes."""
    info = np.finfo(dtype)
    words = rng.integers(0, np.iinfo(WORDS[info.dtype.itemsize]).max, 5_000, dtype=np.uint64)
    random = words.astype(WORDS[info.dtype.itemsize]).view(dtype)
    typical = np.ldexp(rng.uniform(1.0, 2.0, 5_000), rng.integers(-30, 30, 5_000)).astype(dtype)
    powers = np.ldexp(np.ones(80, dtype=dtype), np.arange(info.minexp - 10, info.minexp + 70))
    special = np.array(
        [0.0, -0.0, info.smallest_subnormal, info.smallest_normal, info.max, 1.0, 1.5], dtype=dtype
    )
    values = np.concatenate([random, typical, powers, np.nextafter(powers, 0), special])
    values = values[np.isfinite(values)]
    return np.concatenate([values, -values])


@pytest.mark.parametrize(("grid", "dtype"), [("F32", np.float32), ("F64", np.float64)])
def test_rounding_variance_of_wide_formats_is_the_nextafter_spacing(grid, dtype):
    values = _interesting_wide_values(dtype, np.random.default_rng(5))
    magnitudes = np.abs(values)
    with np.errstate(over="ignore"):
        up = np.nextafter(magnitudes, np.inf)
    top = ~np.isfinite(up)
    ulp = np.where(top, magnitudes - np.nextafter(magnitudes, 0), up - magnitudes)
    _assert_variance_is(noise.rounding_variance(values, grid), ulp.astype(np.float64))


def test_f32_words_on_the_bf16_grid_get_bf16_ulps():
    values = _every_finite_value(ml_dtypes.bfloat16)
    ulp = _spacing_away_from_zero(values, values)
    _assert_variance_is(noise.rounding_variance(values.astype(np.float32), "BF16"), ulp)


def test_rounding_variance_chunk_by_chunk_equals_whole():
    rng = np.random.default_rng(1)
    stored = (0.02 * rng.standard_normal((300, 70))).astype(ml_dtypes.bfloat16)
    out = np.full(stored.shape, np.nan, dtype=np.float32)
    for start in range(0, 300, 64):
        noise.rounding_variance(stored[start : start + 64], "BF16", out=out[start : start + 64])
    np.testing.assert_array_equal(out, noise.rounding_variance(stored, "BF16"))


def test_rounding_variance_fills_strided_and_0d_outputs_in_place():
    stored = np.random.default_rng(6).standard_normal((50, 40)).astype(np.float32)
    out = np.zeros((50, 40), dtype=np.float32)
    noise.rounding_variance(stored[:, ::3], "F32", out=out[:, ::3])
    np.testing.assert_array_equal(out[:, ::3], noise.rounding_variance(stored, "F32")[:, ::3])
    assert not out[:, 1::3].any()
    scalar = np.zeros((), dtype=np.float32)
    noise.rounding_variance(np.array(0.5, dtype=ml_dtypes.bfloat16), "BF16", out=scalar)
    assert scalar == np.float32(2.0**-16 / 12)  # ulp of 0.5 in BF16 is 2^-8


@pytest.mark.parametrize("grid", ["F8_E8M0", "I32"])
def test_grid_without_rounding_model_is_a_usage_error(grid):
    with pytest.raises(UsageError, match=grid):
        noise.rounding_variance(np.zeros(3, dtype=np.float32), grid)


def test_integer_arrays_have_no_rounding_model():
    with pytest.raises(UsageError, match="int32"):
        noise.rounding_variance(np.zeros(3, dtype=np.int32), "F32")


def test_tables_name_the_formats_bits_and_minimum_exponents():
    assert noise.STORAGE_BITS == {
        "F64": 52, "F32": 23, "F16": 10, "BF16": 7, "F8_E4M3": 3, "F8_E5M2": 2
    }  # fmt: skip
    for grid, dtype in {**SMALL_FORMATS, "F32": np.float32, "F64": np.float64}.items():
        info = ml_dtypes.finfo(dtype)
        assert noise.MIN_EXPONENT[grid] == info.minexp
        assert noise.STORAGE_BITS[grid] == info.nmant


# --- storage_grid -----------------------------------------------------------------------


def test_storage_grid_finds_bf16_values_in_an_f32_tensor():
    rng = np.random.default_rng(2)
    upcast = rng.standard_normal((700, 300)).astype(ml_dtypes.bfloat16).astype(np.float32)
    assert noise.storage_grid(upcast, "F32") == "BF16"
    assert noise.storage_grid(upcast[::2], "F32") == "BF16"
    upcast[-1, -1] = np.float32(1.0) + FLOAT32.eps  # one word off the grid, in the last chunk
    assert noise.storage_grid(upcast, "F32") == "F32"


@pytest.mark.parametrize(
    ("stored", "dtype"),
    [
        (np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32), "F32"),
        (np.ones((4, 4), dtype=ml_dtypes.bfloat16), "BF16"),
        (np.ones((4, 4), dtype=np.float16), "F16"),
        (np.ones((4, 4), dtype=np.int64), "I64"),
        (np.zeros((0, 4), dtype=np.float32), "F32"),
    ],
)
def test_storage_grid_is_the_dtype_otherwise(stored, dtype):
    assert noise.storage_grid(stored, dtype) == dtype


# --- null cases: pure rounding noise must give signal rank 0 -----------------------------

PROFILES = ("iid", "rows", "columns", "outliers", "student", "super")
SHAPES = ((256, 256), (512, 128), (128, 512), (384, 256))
STORAGES = ("BF16", "F16", "BF16-in-F32", "F16-vs-BF16")


def _weight(profile: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A float32 weight of a given profile (heavy rows/columns/entries are what break MP edges)."""
    rows, columns = shape
    weight = 0.02 * rng.standard_normal(shape)
    if profile == "rows":
        weight *= np.exp(rng.standard_normal((rows, 1)))
    elif profile == "columns":
        weight *= np.exp(rng.standard_normal((1, columns)))
    elif profile == "outliers":
        weight[:, rng.choice(columns, max(1, columns // 100), replace=False)] *= 30.0
    elif profile == "student":
        weight = 0.02 * rng.standard_t(3, shape)
    elif profile == "super":
        weight[rng.integers(rows), rng.integers(columns)] = 3.0
    return weight.astype(np.float32)


def _null_update(weight: np.ndarray, storage: str) -> tuple[np.ndarray, np.ndarray, int]:
    """ΔW, variance and roundings when the weight did not change: ΔW is rounding error only."""
    if storage == "F16-vs-BF16":  # the same weight released in two formats
        base, tuned = weight.astype(np.float16), weight.astype(ml_dtypes.bfloat16)
        variance = noise.rounding_variance(base, "F16") + noise.rounding_variance(tuned, "BF16")
        return tuned.astype(np.float32) - base.astype(np.float32), variance, 2
    tuned = weight.astype(np.float16 if storage == "F16" else ml_dtypes.bfloat16)
    dtype = "F16" if storage == "F16" else "BF16"
    if storage == "BF16-in-F32":
        tuned, dtype = tuned.astype(np.float32), "F32"
    variance = noise.rounding_variance(tuned, noise.storage_grid(tuned, dtype))
    variance += noise.rounding_variance(weight, "F32")  # the base, kept in F32
    return tuned.astype(np.float32) - weight, variance, 1


def _null_margin(profile: str, shape: tuple[int, int], storage: str, seed: int) -> float:
    """σ₁(ΔW)/τ of one null case, after checking that its signal rank is 0."""
    rng = np.random.default_rng(seed)
    delta, variance, roundings = _null_update(_weight(profile, shape, rng), storage)
    floor = noise.noise_floor(delta, variance, rng, roundings=roundings)
    values = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    assert signal.signal_rank(values, floor.threshold) == 0, (profile, shape, storage, floor)
    return float(values[0] / floor.threshold)


def null_grid_worst_margin(seed: int = 11) -> float:
    """The largest σ₁/τ over the whole null grid (for benchmarks and the docstring's figure)."""
    margins = [
        _null_margin(profile, shape, storage, seed)
        for profile in PROFILES
        for shape in SHAPES
        for storage in STORAGES
    ]
    return max(margins)


# Worst σ₁/τ over this grid: 0.871 (seed 11; seeds 0, 1, 2: 0.876, 0.884, 0.883).
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("profile", PROFILES)
def test_pure_rounding_noise_has_signal_rank_zero(profile, storage):
    for shape in SHAPES:
        assert _null_margin(profile, shape, storage, seed=11) < 0.95


def test_zero_update_has_zero_threshold_and_no_signal():
    delta = np.zeros((128, 200), dtype=np.float32)
    variance = noise.rounding_variance(np.full((128, 200), 0.02, dtype=ml_dtypes.bfloat16), "BF16")
    floor = noise.noise_floor(delta, variance, np.random.default_rng(0))
    assert floor.flip_edge == floor.edge == floor.threshold == 0.0
    assert signal.signal_rank(np.zeros(128), floor.threshold) == 0


def test_noise_floor_reads_delta_without_writing_it():
    rng = np.random.default_rng(4)
    delta, variance, _ = _null_update(_weight("iid", (256, 160), rng), "BF16")
    kept = delta.copy()
    floor = noise.noise_floor(delta, variance, rng)
    np.testing.assert_array_equal(delta, kept)
    assert floor.noise_energy == pytest.approx(np.sum(variance, dtype=np.float64), rel=1e-12)
    row_sum = np.sum(variance, axis=1, dtype=np.float64).max()
    column_sum = np.sum(variance, axis=0, dtype=np.float64).max()
    assert floor.profile_bound == pytest.approx(math.sqrt(row_sum) + math.sqrt(column_sum))


# --- Weyl: ΔW = L + N with the noise N known exactly --------------------------------------

BF16 = ml_dtypes.bfloat16


def _low_rank(shape, rank: int, norm: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """L = U diag(spikes) Vᵀ with known spikes (a 2:1 spread), ‖L‖_F = ``norm``."""
    left = np.linalg.qr(rng.standard_normal((shape[0], rank)))[0]
    right = np.linalg.qr(rng.standard_normal((shape[1], rank)))[0]
    spikes = np.linspace(1.0, 0.5, rank)
    spikes *= norm / np.linalg.norm(spikes)
    return (left * spikes) @ right.T, spikes


def _stored_pair(case: str, weight: np.ndarray, update: np.ndarray):
    """(base, tuned) as stored, for the three ways a fine-tune reaches BF16 files."""
    if case == "tuned-rounded":
        return weight, (weight + update).astype(np.float32).astype(BF16)
    base = weight.astype(BF16)
    if case == "both-rounded":  # each file rounded from its own float32 master
        return base, (weight + update).astype(np.float32).astype(BF16)
    return base, (base.astype(np.float32) + update).astype(np.float32).astype(BF16)


def _variance(stored: np.ndarray) -> np.ndarray:
    dtype = "BF16" if stored.dtype == BF16 else "F32"
    return noise.rounding_variance(stored, dtype)


WEYL_CASES = ("tuned-rounded", "both-rounded", "from-stored-base")
WEYL_GRID = [
    (profile, shape, rank, size)
    for profile in ("iid", "rows")
    for shape in ((256, 256), (128, 384))
    for rank in (1, 4, 8)
    for size in (3e-4, 1e-3, 3e-3, 1e-2)
]


def _weyl_kind(case: str, profile, shape, rank: int, size: float, rng) -> tuple[str, float]:
    """Which of Weyl's bounds applies to one layer, after asserting it; and ‖N‖₂/τ."""
    weight = _weight(profile, shape, rng)
    update, spikes = _low_rank(shape, rank, size * np.linalg.norm(weight), rng)
    base, tuned = _stored_pair(case, weight, update)
    delta = tuned.astype(np.float32) - base.astype(np.float32)
    roundings = 1 if base.dtype == np.float32 else 2
    floor = noise.noise_floor(delta, _variance(tuned) + _variance(base), rng, roundings=roundings)
    values = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    found = signal.signal_rank(values, floor.threshold)
    noise_norm = np.linalg.norm(delta.astype(np.float64) - update, 2)
    where = (case, profile, shape, rank, size, found, noise_norm, floor)
    if floor.threshold < noise_norm:
        return "uncovered", noise_norm / floor.threshold
    if spikes[-1] > floor.threshold + noise_norm:
        assert found == rank, where
        return "exact", noise_norm / floor.threshold
    assert found <= rank, where
    return "bounded", noise_norm / floor.threshold


def weyl_kinds(case: str, seed: int = 7) -> Counter:
    """How often each bound applied over the grid (every applicable one asserted)."""
    rng = np.random.default_rng(seed)
    return Counter(_weyl_kind(case, *layer, rng)[0] for layer in WEYL_GRID)


# Seed 7 gives exact/bounded/uncovered = 22/26/0, 22/26/0 and 21/7/20 for the three
# cases; "uncovered" (τ < ‖N‖₂) happens when the update is below an ulp of a stored base:
# the noise is then the update's own quantization, not independent of it.
@pytest.mark.parametrize("case", WEYL_CASES)
def test_signal_rank_obeys_weyl_whenever_the_threshold_covers_the_noise(case):
    kinds = weyl_kinds(case)
    assert kinds["exact"] and kinds["bounded"], kinds
    if case == "tuned-rounded":  # independent rounding noise: the estimate must cover it
        assert not kinds["uncovered"], kinds


# --- clean energy and ranks on a hand-worked spectrum -----------------------------------

# σ = 4, 3, 1, 0.5 of a 4×q=4 update: ‖ΔW‖² = 16 + 9 + 1 + 0.25 = 26.25; τ = 2 → r_s = 2.
VALUES = np.array([4.0, 3.0, 1.0, 0.5])
TOTAL = 26.25


def test_clean_noise_energy_is_the_smaller_of_model_and_residual():
    assert signal.signal_rank(VALUES, 2.0) == 2
    assert signal.clean_noise_energy(VALUES, TOTAL, 2.0, 2) == 1.25  # residual 26.25 − 25
    assert signal.clean_noise_energy(VALUES, TOTAL, 1.0, 2) == 1.0  # the model's Σv
    assert signal.clean_noise_energy(np.array([2.0]), 3.9, 1.0, 1) == 0.0  # never negative


def test_clean_gains_take_an_even_share_of_noise_per_direction():
    # N̂ = 1.25 over q = 4 directions: 0.3125 each.
    np.testing.assert_array_equal(signal.clean_gains(VALUES, 1.25, 4, 2), [15.6875, 8.6875])
    assert signal.clean_gains(VALUES, 1.25, 4, 0).size == 0


@pytest.mark.parametrize(
    ("energy", "expected"),
    [(0.5, 1), (0.6275, 1), (0.6276, 2), (0.95, 2), (1.0, 2)],
)
def test_clean_rank_reads_the_clean_energy_curve(energy, expected):
    # Clean total 26.25 − 1.25 = 25; cumulative gains 15.6875, 24.375 (0.6275 and 0.975 of it);
    # E = 1 needs 25, which no k ≤ r_s reaches, so r_s.
    assert signal.clean_rank(VALUES, TOTAL, 1.25, 4, energy, 2) == expected


def test_clean_rank_is_zero_without_signal_and_checks_the_target():
    assert signal.clean_rank(VALUES, TOTAL, 1.25, 4, 0.9, 0) == 0
    with pytest.raises(UsageError):
        signal.clean_rank(VALUES, TOTAL, 1.25, 4, 1.5, 2)


# --- the threshold factor and the edge estimate ---------------------------------------------


def test_gavish_donoho_factor_matches_the_papers_limits():
    assert noise.gavish_donoho_factor(1.0) == pytest.approx(4 / math.sqrt(3), rel=1e-12)
    assert noise.gavish_donoho_factor(1.0) / 2 == pytest.approx(1.1547, abs=1e-4)
    beta = 1e-8
    assert noise.gavish_donoho_factor(beta) / (1 + math.sqrt(beta)) == pytest.approx(
        math.sqrt(2), rel=1e-3
    )


@pytest.mark.parametrize(
    ("sim", "flip", "edge"), [(1.0, 1.2, 1.2), (1.2, 1.0, 1.2), (1.0, 1.3, 1.0), (1.0, 0.7, 0.7)]
)
def test_edges_that_agree_give_the_larger_else_the_smaller(sim, flip, edge):
    assert noise.combine_edges(sim, flip) == edge


@pytest.mark.parametrize("shape", [(300, 300), (600, 150), (150, 600)])
@pytest.mark.parametrize("spiked", [False, True])
def test_lanczos_edge_is_a_close_lower_bound_of_sigma_1(shape, spiked):
    rng = np.random.default_rng(8)
    matrix = rng.uniform(-1, 1, shape).astype(np.float32)
    if spiked:
        matrix += 3 * np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1])) / 10
    exact = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[0]
    estimate = noise.top_singular_value(matrix, rng)
    assert exact * 0.99 <= estimate <= exact * (1 + 1e-5)


# --- the README's case: a rank-8 update at 0.1 % of ‖W‖ merged into BF16 ------------------


def _energy_rank(values: np.ndarray, energy: float) -> int:
    curve = np.cumsum(values.astype(np.float64) ** 2) / np.sum(values.astype(np.float64) ** 2)
    return int(np.searchsorted(curve, energy)) + 1


def test_readme_update_is_found_above_the_bf16_noise():
    # The construction of tests/test_rounding_noise.py's _merged_bf16_pair, without files.
    rng = np.random.default_rng(0)
    weight = (0.02 * rng.standard_normal((1024, 1024))).astype(ml_dtypes.bfloat16)
    update = rng.standard_normal((1024, 8)) @ rng.standard_normal((8, 1024))
    update *= 1e-3 * np.linalg.norm(weight.astype(np.float32)) / np.linalg.norm(update)
    tuned = (weight.astype(np.float32) + update).astype(ml_dtypes.bfloat16)
    delta = tuned.astype(np.float32) - weight.astype(np.float32)
    variance = noise.rounding_variance(tuned, "BF16") + noise.rounding_variance(weight, "BF16")

    floor = noise.noise_floor(delta, variance, np.random.default_rng(1), roundings=2)
    values = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    total = float(np.sum(delta.astype(np.float64) ** 2))
    found = signal.signal_rank(values, floor.threshold)
    assert found == 8
    clean = signal.clean_noise_energy(values, total, floor.noise_energy, found)
    ranks = [signal.clean_rank(values, total, clean, 1024, e, found) for e in (0.95, 0.90, 0.85)]
    truth = [_energy_rank(np.linalg.svd(update, compute_uv=False), e) for e in (0.95, 0.90, 0.85)]
    # Measured: clean 8/8/7, the float32 update's own 8/8/7 (raw ranks read 465 at 95 %).
    assert all(rank <= 8 for rank in ranks)
    assert np.all(np.abs(np.subtract(ranks, truth)) <= 1), (ranks, truth)


def test_a_dominant_update_settles_the_edge_after_one_flip_and_an_exact_profile_is_reused(
    monkeypatch,
):
    """Past agreement × the sim edge one flip decides: the same τ as every flip drawn."""
    rng = np.random.default_rng(5)
    weight = _weight("iid", (256, 160), rng)
    delta, variance, _ = _null_update(weight, "BF16")
    delta = delta + np.outer(rng.standard_normal(256), rng.standard_normal(160)).astype(np.float32)
    early = noise.noise_floor(delta, variance, np.random.default_rng(0))
    flips = []
    real_flip = noise._flip_edge

    def counted(*args):
        flips.append(real_flip(*args))
        return flips[-1]

    monkeypatch.setattr(noise, "_flip_edge", counted)
    profile = noise.variance_profile(variance, 1)
    again = noise.noise_floor(delta, variance, np.random.default_rng(0), profile=profile)
    assert len(flips) == 1 and flips[0] > noise._AGREEMENT * again.sim_edge
    assert again == early
    flips.clear()
    monkeypatch.setattr(
        noise, "_flip_edges", lambda s, d, r, draws, _: max(counted(s, d, r) for _ in range(draws))
    )
    every = noise.noise_floor(delta, variance, np.random.default_rng(0))
    assert len(flips) == 2
    assert every.edge == early.edge == early.sim_edge
    assert every.threshold == early.threshold
    assert every.noise_energy == pytest.approx(float(np.sum(variance, dtype=np.float64)))
