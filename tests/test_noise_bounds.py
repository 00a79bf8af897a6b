"""The cheap side of the noise floor: profile bounds, τ's bracket, and when the bracket answers.

The references are independent of the code under test: the exact per-entry
rounding variance (exponent bits, checked in test_noise.py) and the full
estimate of τ from simulated and sign-flip draws.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

from svdrank import analyze, recommend
from svdrank.analysis.delta import form_delta, layer_variance
from svdrank.analysis.floor import MODEL_UNCHANGED
from svdrank.inputs.checkpoint import open_checkpoint
from svdrank.inputs.pairing import pair_checkpoints
from svdrank.spectra.energy import rank_at
from svdrank.spectra.noise import (
    entry_dominates,
    noise_floor,
    smallest_variance,
    square_scale,
    threshold_bounds,
    variance_profile,
)
from svdrank.spectra.signal import clean_noise_energy, clean_rank, clean_spectrum, signal_rank
from tests.conftest import assert_one_line_error, write_checkpoint

PROFILES = ("iid", "rows", "columns", "outliers", "student", "super")
SHAPES = ((192, 192), (96, 384), (384, 96))
STORAGES = ("tuned", "both", "from_base", "f16")


def _weights(profile: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A float32 weight of 0.02 scale with one of the uneven profiles real weights have."""
    g = rng.standard_normal(shape)
    if profile == "rows":
        g *= np.exp(rng.standard_normal((shape[0], 1)))
    elif profile == "columns":
        g *= np.exp(rng.standard_normal((1, shape[1])))
    elif profile == "outliers":
        g[:, rng.choice(shape[1], 4, replace=False)] *= 20.0
    elif profile == "student":
        g = rng.standard_t(3, shape)
    elif profile == "super":
        g[3, 5] = 500.0
    return (0.02 * g).astype(np.float32)


def _stored_pair(weight: np.ndarray, update: np.ndarray, storage: str) -> tuple:
    """Base and tuned as a checkpoint stores them in each storage case."""
    bf16 = ml_dtypes.bfloat16
    if storage == "tuned":
        return weight, (weight + update).astype(bf16)
    if storage == "both":
        return weight.astype(bf16), (weight + update).astype(bf16)
    if storage == "from_base":
        base = weight.astype(bf16)
        return base, (base.astype(np.float32) + update).astype(bf16)
    return weight, (weight + update).astype(np.float16)


def _layer(tmp_path, base: np.ndarray, tuned: np.ndarray):
    """The one layer of a pair written to disk."""
    base_file = write_checkpoint(tmp_path / "base.safetensors", {"proj.weight": base})
    tuned_file = write_checkpoint(tmp_path / "tuned.safetensors", {"proj.weight": tuned})
    pairing = pair_checkpoints(open_checkpoint(base_file), open_checkpoint(tuned_file), (), ())
    return pairing.layers[0]


CASES = list(itertools.product(PROFILES, SHAPES, STORAGES))


@pytest.mark.parametrize(("profile", "shape", "storage"), CASES)
def test_bounds_hold_the_exact_profile_and_bracket_tau(tmp_path, profile, shape, storage):
    rng = np.random.default_rng(sum(map(ord, profile + storage)) + shape[0])
    weight = _weights(profile, shape, rng)
    update = 1e-4 * np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1]))
    layer = _layer(tmp_path, *_stored_pair(weight, update.astype(np.float32), storage))
    formed = form_delta(layer, noise=True)
    rounding = formed.rounding
    variance = layer_variance(layer, rounding.grids).astype(np.float64)
    bounds = rounding.bounds
    # v = u²/12 with u in (|x|/2, |x|]·2^-p: each sum within a factor 4 below its bound.
    for exact, bound in (
        (variance.sum(), bounds.energy),
        (variance.sum(axis=1).max(), bounds.row_max),
        (variance.sum(axis=0).max(), bounds.column_max),
        (variance.max(), bounds.entry_max),
    ):
        assert exact <= bound * (1 + 1e-6) and bound <= 4.0 * exact * (1 + 1e-6)
    assert rounding.unchanged == np.count_nonzero(formed.delta == 0)
    floor = noise_floor(
        formed.delta,
        variance.astype(np.float32),
        np.random.default_rng(0),
        roundings=rounding.roundings,
    )
    model_holds = rounding.unchanged <= MODEL_UNCHANGED * formed.delta.size
    exact = variance_profile(variance.astype(np.float32), rounding.roundings)
    for profile in (bounds, exact):  # from the squares, then from the variances themselves
        low, high = threshold_bounds(profile, shape)
        assert floor.threshold <= high
        if model_holds and not entry_dominates(profile):
            assert low <= floor.threshold


def _decaying_pair(tmp_path, shape, alpha, relative, seed=0):
    """A BF16 pair whose update decays like i^-alpha (as the pipeline benchmark's)."""
    rng = np.random.default_rng(seed)
    weight = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    update = rng.standard_normal(shape) * np.arange(1, shape[1] + 1) ** -alpha
    update *= relative * np.linalg.norm(weight) / np.linalg.norm(update)
    bf16 = ml_dtypes.bfloat16
    base = write_checkpoint(tmp_path / "base.safetensors", {"proj.weight": weight.astype(bf16)})
    tuned = write_checkpoint(
        tmp_path / "tuned.safetensors", {"proj.weight": (weight + update).astype(bf16)}
    )
    return base, tuned


@pytest.mark.parametrize(
    ("alpha", "relative", "estimate"),
    [(1.0, 0.1, "bound"), (0.5, 0.1, None), (1.0, 1e-3, "draws"), (0.5, 3e-3, "draws")],
)
def test_noise_aware_ranks_equal_those_from_the_full_estimate(tmp_path, alpha, relative, estimate):
    """Whichever way τ was set, the preset ranks are those the full estimate of τ gives."""
    base, tuned = _decaying_pair(tmp_path, (320, 256), alpha, relative)
    layer = analyze(base, tuned).layers[0]
    noise = layer.noise
    if estimate is not None:
        assert noise.estimate == estimate
    stored = pair_checkpoints(open_checkpoint(base), open_checkpoint(tuned), (), ()).layers[0]
    formed = form_delta(stored, noise=True)
    variance = layer_variance(stored, formed.rounding.grids)
    floor = noise_floor(
        formed.delta,
        variance,
        np.random.default_rng([0, 0, 1]),
        roundings=formed.rounding.roundings,
    )
    values = np.linalg.svd(formed.delta.astype(np.float64), compute_uv=False)
    total = float(np.sum(values**2))
    full_rank = signal_rank(values, floor.threshold)
    noise_energy = clean_noise_energy(values, total, floor.noise_energy, full_rank)
    if noise.signal_rank_exact:
        assert noise.signal_rank == full_rank
    else:
        assert noise.signal_rank <= full_rank
    clean = clean_spectrum(layer)
    for target in (0.85, 0.90, 0.95):
        expected = clean_rank(
            values, total, noise_energy, min(values.shape[0], 320), target, full_rank
        )
        assert rank_at(clean, target) == expected, (target, noise)


def test_the_bracket_answers_fast_large_updates_without_draws(tmp_path):
    """An update far above the noise stops at its energy target; no draw is made."""
    base, tuned = _decaying_pair(tmp_path, (640, 512), 1.0, 0.1)
    layer = analyze(base, tuned).layers[0]
    assert layer.noise.estimate == "bound"
    assert not layer.spectrum.complete
    assert layer.noise.signal_rank == layer.spectrum.k  # every value computed stands above τ
    assert not layer.noise.signal_rank_exact


def test_a_zero_update_has_no_signal(tmp_path):
    weight = (0.02 * np.random.default_rng(0).standard_normal((64, 96))).astype(ml_dtypes.bfloat16)
    base = write_checkpoint(tmp_path / "base.safetensors", {"proj.weight": weight})
    tuned = write_checkpoint(tmp_path / "tuned.safetensors", {"proj.weight": weight})
    layer = analyze(base, tuned).layers[0]
    assert layer.spectrum.k == 0 and layer.spectrum.total_energy == 0.0
    assert layer.noise.signal_rank == 0 and layer.noise.unchanged == 1.0


def test_the_sample_checkpoints_planted_ranks_are_their_signal_ranks():
    """q_proj of block b holds an exactly rank-(2 + 2b) update; BERT's (F32) query 2, key 4."""
    llama = analyze("sample_checkpoints/base.safetensors", "sample_checkpoints/tuned.safetensors")
    found = {layer.module: layer.noise.signal_rank for layer in llama.layers}
    for block in range(4):
        assert found[f"model.layers.{block}.self_attn.q_proj"] == 2 + 2 * block
    (conservative,) = recommend(llama, preset="conservative")
    planted = {f"model.layers.{b}.self_attn.q_proj": 2 + 2 * b for b in range(4)}
    for item in conservative.layers:
        if item.layer.module in planted:
            # A flat rank-r spectrum needs all r values for 95 % of its energy.
            assert item.rank == planted[item.layer.module]
    encoder = analyze(
        "sample_checkpoints/encoder-base.safetensors",
        "sample_checkpoints/encoder-tuned.safetensors",
    )
    assert all(layer.noise is None for layer in encoder.layers)  # F32: no floor
    (conservative,) = recommend(encoder, preset="conservative")
    planted = {"attention.self.query": 2, "attention.self.key": 4}
    for item in conservative.layers:
        kind = item.layer.kind.removeprefix("attention.self.")
        if f"attention.self.{kind}" in planted:
            assert item.rank == item.raw_rank == planted[f"attention.self.{kind}"]


def test_the_signal_preset_is_refused_in_one_line_for_layers_without_a_floor(run_cli, tmp_path):
    """F32 inputs have no storage noise floor, so no signal rank: exit 2, the layer named."""
    analysis = tmp_path / "f32.json"
    encoder = (
        "sample_checkpoints/encoder-base.safetensors",
        "sample_checkpoints/encoder-tuned.safetensors",
    )
    assert run_cli("diff", *encoder, "-o", analysis, "--quiet").exit_code == 0
    result = run_cli("recommend", analysis, "--preset", "signal", "--format", "json")
    assert_one_line_error(result, "no storage noise floor", "energy preset")


FORM_STORAGES = {
    "bf16": (ml_dtypes.bfloat16, ml_dtypes.bfloat16),
    "f16": (np.float16, np.float16),
    "f8": (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fn),
    "f16 base, bf16 tuned": (np.float16, ml_dtypes.bfloat16),
    "f32 base, bf16 tuned": (np.float32, ml_dtypes.bfloat16),
    "f64 base, bf16 tuned": (np.float64, ml_dtypes.bfloat16),
}
"""Storage pairs whose ΔW and profile the host forms from widened blocks."""
PROFILE_RTOL = 1e-5
"""The host sums each block's rows and columns in float32 (BLAS products with ones): a sum
of n ≤ 1000 positive terms errs by at most ~n·2⁻²⁴ ≈ 6e-5 relative, typically √n·2⁻²⁴."""


@pytest.mark.parametrize("storage", sorted(FORM_STORAGES))
@pytest.mark.parametrize("shape", [(300, 170), (40, 1000)])
def test_the_host_forms_delta_and_its_profile_as_a_float64_reference(tmp_path, storage, shape):
    rng = np.random.default_rng(len(storage) + shape[0])
    base_type, tuned_type = FORM_STORAGES[storage]
    scale = 2.0 if base_type is ml_dtypes.float8_e4m3fn else 0.02
    weight = scale * rng.standard_normal(shape).astype(np.float32)
    base = weight.astype(base_type)
    tuned = (weight + 0.1 * scale * rng.standard_normal(shape)).astype(tuned_type)
    tuned[:3] = base[:3].astype(tuned_type)  # unchanged rows
    layer = _layer(tmp_path, base, tuned)
    formed = form_delta(layer, noise=True)

    wide = np.float64 if base_type is np.float64 else np.float32
    reference = np.subtract(tuned.astype(wide), base.astype(wide), dtype=wide)
    assert formed.delta.dtype == wide and formed.delta.tobytes() == reference.tobytes()
    rounding = formed.rounding
    assert rounding.unchanged == int(np.sum(tuned.astype(np.float64) == base.astype(np.float64)))
    bound = np.zeros(shape)
    for grid, side in zip(rounding.grids, (base, tuned), strict=True):
        if grid in ("BF16", "F16", "F8_E4M3"):
            bound += square_scale(grid) * side.astype(np.float64) ** 2 + smallest_variance(grid)
    sums = rounding.bounds
    np.testing.assert_allclose(
        (sums.energy, sums.row_max, sums.column_max, sums.entry_max),
        (bound.sum(), bound.sum(axis=1).max(), bound.sum(axis=0).max(), bound.max()),
        rtol=PROFILE_RTOL,
    )


def test_a_sign_flip_of_a_zero_is_no_change(tmp_path):
    base = np.zeros((4, 100), dtype=ml_dtypes.bfloat16)
    tuned = base.copy()
    tuned[0, :10] = -0.0
    tuned[1, :5] = 1.0
    formed = form_delta(_layer(tmp_path, base, tuned), noise=True)
    assert formed.rounding.unchanged == 400 - 5
