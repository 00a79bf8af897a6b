"""The README's BF16 rounding-noise example: the numbers it states, against NumPy's SVD.

A rank-8 update merged into BF16 weights: at 0.1 % of the weight's norm the
rounding error of the tuned entries holds about half of ‖ΔW‖², so the raw
ranks at 95 % count noise (``--noise off``), while the noise-aware ranks are
those of the planted update. The reference is NumPy's float64 SVD of the same
ΔW (BF16 differences are exact in float64) and of the float32 update itself,
never svdrank's own output.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from svdrank import analyze, recommend
from svdrank.spectra.energy import rank_at


def _merged_bf16_pair(tmp_path, size: float, noise: str = "off"):
    """The README's pair: a rank-8 update of ``size``·‖W‖ merged into BF16 weights."""
    rng = np.random.default_rng(0)
    weight = (0.02 * rng.standard_normal((1024, 1024))).astype(ml_dtypes.bfloat16)
    update = rng.standard_normal((1024, 8)) @ rng.standard_normal((8, 1024))
    update *= size * np.linalg.norm(weight.astype(np.float32)) / np.linalg.norm(update)
    tuned = (weight.astype(np.float32) + update).astype(ml_dtypes.bfloat16)
    base_path, tuned_path = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_file({"proj.weight": weight}, base_path)
    save_file({"proj.weight": tuned}, tuned_path)
    delta = tuned.astype(np.float64) - weight.astype(np.float64)
    return analyze(base_path, tuned_path, noise=noise), np.linalg.svd(delta, compute_uv=False)


def _numpy_rank(sigma: np.ndarray, energy: float) -> int:
    curve = np.cumsum(sigma**2) / np.sum(sigma**2)
    return int(np.searchsorted(curve, energy)) + 1


def test_small_update_ranks_count_the_rounding_noise(tmp_path):
    analysis, sigma = _merged_bf16_pair(tmp_path, 1e-3)
    ranks = [rank_at(analysis.layers[0].spectrum, e) for e in (0.95, 0.90, 0.85)]
    assert ranks == [_numpy_rank(sigma, e) for e in (0.95, 0.90, 0.85)]
    assert ranks[0] == 465  # the README's figure
    energy_in_8 = np.sum(sigma[:8] ** 2) / np.sum(sigma**2)
    assert energy_in_8 == pytest.approx(0.46, abs=0.005)
    assert sigma[7] / sigma[0] == pytest.approx(0.80, abs=0.005)
    assert sigma[8] / sigma[0] == pytest.approx(0.21, abs=0.005)


def test_sv_ratio_4_keeps_the_update_above_the_noise(tmp_path):
    analysis, sigma = _merged_bf16_pair(tmp_path, 1e-3)
    (plan,) = recommend(analysis, sv_ratio=4, noise="off")
    assert plan.layers[0].rank == int(np.sum(sigma >= sigma[0] / 4)) == 8


def test_noise_aware_ranks_are_the_planted_updates(tmp_path):
    """By default: signal rank 8, and the presets give the float32 update's own ranks."""
    analysis, _ = _merged_bf16_pair(tmp_path, 1e-3, noise="auto")
    rng = np.random.default_rng(0)
    rng.standard_normal((1024, 1024))  # the weight, drawn first
    left, right = rng.standard_normal((1024, 8)), rng.standard_normal((8, 1024))
    core = np.linalg.svd(np.linalg.qr(left)[1] @ np.linalg.qr(right.T)[1].T, compute_uv=False)
    truth = [_numpy_rank(core, e) for e in (0.95, 0.90, 0.85)]
    plans = recommend(analysis)
    assert truth == [8, 8, 7]
    assert [plan.layers[0].rank for plan in plans] == truth
    assert analysis.layers[0].noise.signal_rank == 8
    assert analysis.layers[0].spectrum.k < 64  # stopped at τ: not 465 values
    assert [plan.layers[0].raw_rank for plan in plans] == [None, None, None]


def test_larger_update_needs_its_own_rank_only(tmp_path):
    analysis, sigma = _merged_bf16_pair(tmp_path, 1e-2)
    assert rank_at(analysis.layers[0].spectrum, 0.95) == _numpy_rank(sigma, 0.95) == 8
    assert np.sum(sigma[:8] ** 2) / np.sum(sigma**2) == pytest.approx(0.97, abs=0.005)
