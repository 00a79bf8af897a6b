"""Signal rank end to end: checkpoints whose update NumPy knows, stored on rounding grids.

A BF16 or F16 file rounds every entry, so ΔW read from two files is the update
L plus full-rank rounding noise N. Each test here writes the files with the
safetensors library, runs the real ``analyze``/``recommend`` (or the command
line) and checks the answer against what NumPy's exact SVD says of the update
the test planted: the rank of L itself, never the code's own output.

Weyl's inequality |σᵢ(L + N) − σᵢ(L)| ≤ ‖N‖₂ decides what the signal rank must
be: with τ ≥ ‖N‖₂, #{σᵢ(ΔW) > τ} ≤ rank L; with σ_r(L) > τ + ‖N‖₂ it is rank L
exactly. ‖N‖₂ comes from NumPy, N = (stored ΔW) − L.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from svdrank import analyze, recommend
from tests.conftest import assert_one_line_error, write_checkpoint

BF16 = ml_dtypes.bfloat16
PRESETS = {"conservative": 0.95, "balanced": 0.90, "aggressive": 0.85}


def _energy_rank(values: np.ndarray, energy: float) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ energy · Σσ², from float64 sums; 0 for a zero update."""
    squares = np.square(values.astype(np.float64))
    if not squares.any():
        return 0
    curve = np.cumsum(squares) / np.sum(squares)
    return int(np.searchsorted(curve, energy)) + 1


def _numpy_ranks(matrix: np.ndarray) -> dict[str, int]:
    """Ranks at each preset's target from NumPy's exact float64 SVD."""
    values = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    return {preset: _energy_rank(values, target) for preset, target in PRESETS.items()}


def _stored_delta(base: np.ndarray, tuned: np.ndarray) -> np.ndarray:
    """ΔW as the files hold it: every BF16/F16/F32 difference is exact in float64."""
    return tuned.astype(np.float64) - base.astype(np.float64)


def _plans(analysis, noise: str = "auto"):
    """preset → {module: LayerRank} for the three energy presets."""
    return {
        preset: {
            item.layer.module: item
            for item in recommend(analysis, preset=preset, noise=noise)[0].layers
        }
        for preset in PRESETS
    }


def _write_pair(tmp_path, base: dict, tuned: dict):
    base_path = write_checkpoint(tmp_path / "base.safetensors", base)
    return base_path, write_checkpoint(tmp_path / "tuned.safetensors", tuned)


# --- null: the weights did not change, the tuned file only rounded them ------------------

NULL_PROFILES = ("iid", "rows", "columns", "outliers", "student")
NULL_SHAPES = ((192, 192), (128, 384), (384, 128))
NULL_FORMATS = {"BF16": BF16, "F16": np.float16}


def _weight(profile: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A float32 weight whose uneven magnitudes shape the rounding noise (what breaks MP edges)."""
    rows, columns = shape
    weight = 0.02 * rng.standard_normal(shape)
    if profile == "rows":
        weight *= np.exp(rng.standard_normal((rows, 1)))
    elif profile == "columns":
        weight *= np.exp(rng.standard_normal((1, columns)))
    elif profile == "outliers":
        weight[:, rng.choice(columns, 4, replace=False)] *= 20.0
    elif profile == "student":
        weight = 0.02 * rng.standard_t(3, shape)
    return weight.astype(np.float32)


# Measured: the worst σ₁(ΔW)/τ over the 15 layers is 0.885 in BF16 and 0.863 in F16.
@pytest.mark.parametrize("storage", sorted(NULL_FORMATS))
def test_rounding_an_unchanged_weight_gives_no_signal_and_rank_zero(tmp_path, storage):
    rng = np.random.default_rng(11)
    weights = {
        f"{profile}_{rows}x{columns}.weight": _weight(profile, (rows, columns), rng)
        for profile in NULL_PROFILES
        for rows, columns in NULL_SHAPES
    }
    tuned = {name: weight.astype(NULL_FORMATS[storage]) for name, weight in weights.items()}
    analysis = analyze(*_write_pair(tmp_path, weights, tuned), noise="auto")

    assert len(analysis.layers) == len(weights)
    for layer in analysis.layers:
        delta = _stored_delta(weights[layer.name], tuned[layer.name])
        sigma_1 = np.linalg.norm(delta, 2)
        assert sigma_1 > 0.0  # the files differ: ΔW is the rounding error, not zero
        assert layer.noise is not None, layer.module
        assert (layer.noise.grid, layer.noise.base_grid) == (storage, "F32")
        assert layer.noise.signal_rank == 0, (layer.module, sigma_1, layer.noise)
        assert sigma_1 < layer.noise.threshold, (layer.module, sigma_1 / layer.noise.threshold)
    for preset, layers in _plans(analysis).items():
        assert {item.rank for item in layers.values()} == {0}, preset
    signal = recommend(analysis, preset="signal")[0].layers
    assert {item.rank for item in signal} == {0}


# --- a planted rank-8 update above the noise, three ways of reaching the files ----------

SHAPE = (256, 512)
SPIKE_SHARES = np.array([0.35, 0.23, 0.14, 0.09, 0.065, 0.05, 0.05, 0.025])
# Cumulative 0.35, 0.58, 0.72, 0.81, 0.875, 0.925, 0.975, 1: each preset's target lies
# at least 2.5 % of ‖L‖² from the steps on both sides, so the truth is 7/6/5 and an estimate of
# the clean energy that is off by less than that cannot move it.
SPIKES = 0.05 * np.sqrt(SPIKE_SHARES / SPIKE_SHARES[0])  # σ₈(L) = 0.0134
TRUTH = {"conservative": 7, "balanced": 6, "aggressive": 5}
STORAGE_CASES = ("tuned-rounded", "both-rounded", "from-stored-base")


def _planted(shape: tuple[int, int], spikes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """L = U diag(spikes) Vᵀ in float32, U and V with orthonormal columns."""
    left = np.linalg.qr(rng.standard_normal((shape[0], spikes.size)))[0]
    right = np.linalg.qr(rng.standard_normal((shape[1], spikes.size)))[0]
    return ((left * spikes) @ right.T).astype(np.float32)


def _stored_pair(case: str, weight: np.ndarray, update: np.ndarray):
    """(base, tuned) as the files hold them, for the ways a fine-tune reaches BF16."""
    if case == "tuned-rounded":  # base kept in F32
        return weight, (weight + update).astype(BF16)
    base = weight.astype(BF16)
    if case == "both-rounded":  # each file rounded from its own float32 master
        return base, (weight + update).astype(BF16)
    return base, (base.astype(np.float32) + update).astype(BF16)  # tuned from the stored base


def _planted_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = (0.05 * rng.standard_normal(SHAPE)).astype(np.float32)
    return weight, _planted(SHAPE, SPIKES, rng)


def test_planted_update_has_the_designed_ranks():
    _, update = _planted_pair()
    values = np.linalg.svd(update.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(values[:8], SPIKES, rtol=1e-5)
    assert values[8] < 1e-6 * values[0]
    assert _numpy_ranks(update) == TRUTH


def _assert_weyl(signal_rank: int, threshold: float, spikes: np.ndarray, noise_norm: float):
    """The signal rank Weyl's inequality allows, given the noise's true norm."""
    if threshold >= noise_norm:
        assert signal_rank <= spikes.size, (signal_rank, threshold, noise_norm)
    if spikes[-1] > threshold + noise_norm:
        assert signal_rank == spikes.size, (signal_rank, threshold, noise_norm)


# Measured (τ, ‖N‖₂, NumPy's raw ranks at 95/90/85 %) — tuned-rounded: 0.0038, 0.0032,
# 74/13/7; both-rounded: 0.0054, 0.0044, 114/61/25; from-stored-base: 0.0054, 0.0031, 64/8/7.
@pytest.mark.parametrize("case", STORAGE_CASES)
def test_planted_rank_is_the_signal_rank_and_presets_read_the_update(tmp_path, case):
    weight, update = _planted_pair()
    base, tuned = _stored_pair(case, weight, update)
    analysis = analyze(*_write_pair(tmp_path, {"proj.weight": base}, {"proj.weight": tuned}))

    (layer,) = analysis.layers
    delta = _stored_delta(base, tuned)
    noise_norm = np.linalg.norm(delta - update, 2)
    assert layer.noise is not None
    assert layer.noise.grid == "BF16"
    assert layer.noise.roundings == (1 if case == "tuned-rounded" else 2)
    # The design puts σ₈(L) clear of τ + ‖N‖₂, so Weyl pins r_s = 8 in every case.
    assert SPIKES[-1] > layer.noise.threshold + noise_norm, (layer.noise.threshold, noise_norm)
    _assert_weyl(layer.noise.signal_rank, layer.noise.threshold, SPIKES, noise_norm)
    assert layer.noise.signal_rank_exact

    raw = _numpy_ranks(delta)
    for preset, layers in _plans(analysis).items():
        item = layers["proj"]
        assert item.rank == TRUTH[preset], (preset, item.rank, item.raw_rank)
        # A truncated engine's raw rank is never below the exact one (README, Engines).
        assert item.raw_rank is None or item.raw_rank >= raw[preset], (preset, item.raw_rank)
    assert raw["conservative"] > 2 * TRUTH["conservative"]  # the noise the presets left out
    assert recommend(analysis, preset="signal")[0].layers[0].rank == 8


# Measured (τ, ‖N‖₂, r_s, unchanged) for seeds 1/2 — tuned-rounded: 0.0038, 0.0032, 0, 0 %;
# both-rounded: 0.0024/0.0022, 0.0020/0.0018, 1, 91 %; from-stored-base: 0.0003, 0.0017, 1,
# 96 %. From a stored base the update is below one ulp and N = ΔW − L is mostly −L (the
# unchanged entries), not independent noise: τ < ‖N‖₂ and Weyl says nothing there.
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("case", STORAGE_CASES)
def test_faint_update_never_gets_more_signal_than_its_rank(tmp_path, case, seed):
    weight, _ = _planted_pair(seed)
    spikes = SPIKES / 25  # 0.0020 to 0.0005: below τ + ‖N‖₂ in every case
    update = _planted(SHAPE, spikes, np.random.default_rng(seed + 100))
    base, tuned = _stored_pair(case, weight, update)
    analysis = analyze(*_write_pair(tmp_path, {"proj.weight": base}, {"proj.weight": tuned}))

    (layer,) = analysis.layers
    noise_norm = np.linalg.norm(_stored_delta(base, tuned) - update, 2)
    assert layer.noise is not None
    if case != "from-stored-base":  # independent rounding noise: τ must cover it
        assert layer.noise.threshold >= noise_norm, (layer.noise.threshold, noise_norm)
    _assert_weyl(layer.noise.signal_rank, layer.noise.threshold, spikes, noise_norm)
    assert layer.noise.signal_rank <= spikes.size
    for preset, layers in _plans(analysis).items():
        assert layers["proj"].rank <= layer.noise.signal_rank, preset


def test_f32_checkpoints_keep_the_raw_ranks(tmp_path):
    weight, update = _planted_pair()
    tuned = weight + update
    analysis = analyze(*_write_pair(tmp_path, {"proj.weight": weight}, {"proj.weight": tuned}))

    assert analysis.layers[0].noise is None
    aware = {p: layers["proj"].rank for p, layers in _plans(analysis, "auto").items()}
    raw = {p: layers["proj"].rank for p, layers in _plans(analysis, "off").items()}
    assert aware == raw == TRUTH == _numpy_ranks(_stored_delta(weight, tuned))
    off = analyze(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", noise="off")
    assert {p: layers["proj"].rank for p, layers in _plans(off, "off").items()} == TRUTH


# --- the README's pair: rank 8 at 0.1 % of ‖W‖ merged into BF16 reads r@95 = 465 raw ----


def test_readme_pair_recovers_the_rank_8_update(tmp_path):
    # The construction of the README's example (and tests/test_rounding_noise.py).
    rng = np.random.default_rng(0)
    weight = (0.02 * rng.standard_normal((1024, 1024))).astype(BF16)
    left, right = rng.standard_normal((1024, 8)), rng.standard_normal((8, 1024))
    scale = 1e-3 * np.linalg.norm(weight.astype(np.float32)) / np.linalg.norm(left @ right)
    tuned = (weight.astype(np.float32) + scale * (left @ right)).astype(BF16)
    analysis = analyze(*_write_pair(tmp_path, {"proj.weight": weight}, {"proj.weight": tuned}))

    # σ(s·A·B) = s·σ(R_A R_Bᵀ) for thin QRs A = Q_A R_A, Bᵀ = Q_B R_B: exact, 8×8.
    core = np.linalg.qr(left)[1] @ np.linalg.qr(right.T)[1].T
    values = scale * np.linalg.svd(core, compute_uv=False)
    truth = {preset: _energy_rank(values, target) for preset, target in PRESETS.items()}
    assert truth == {"conservative": 8, "balanced": 8, "aggressive": 7}
    (layer,) = analysis.layers
    assert layer.noise is not None and layer.noise.signal_rank == 8
    for preset, layers in _plans(analysis).items():
        item = layers["proj"]
        assert item.rank == truth[preset], (preset, item.rank)
        assert item.raw_rank is None or item.raw_rank > 100, (preset, item.raw_rank)


# --- a real optimizer: Adam in float32 master weights, stored in BF16 -------------------

FINE_TUNE_LRS = (3e-6, 1e-5)


def _mlp(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 32)
    )


def _teacher(torch, seed: int):
    """A fixed random task: y = tanh(x A), A of its own seed."""
    matrix = torch.randn(64, 32, generator=torch.Generator().manual_seed(seed)) / 8

    def task(x):
        return torch.tanh(x @ matrix)

    return task


def _train(torch, model, task, lr: float, steps: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x = torch.randn(128, 64)
        loss = torch.nn.functional.mse_loss(model(x), task(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _weights(torch, model) -> list[np.ndarray]:
    return [m.weight.detach().numpy().copy() for m in model if isinstance(m, torch.nn.Linear)]


@pytest.fixture(scope="module")
def adam_fine_tunes():
    """Float32 base and tuned weights of an MLP: pretrained on task 1, tuned on task 2.

    Pretraining: Adam, lr 1e-3, 300 steps of 128 samples; each fine-tune starts from
    the same state and sees the same batches: Adam, 50 steps, lr from FINE_TUNE_LRS.
    """
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    # Tiny matrices: one thread takes 0.75 s here, two took 22 s while other jobs ran.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = _mlp(torch)
            _train(torch, model, _teacher(torch, 1), 1e-3, 300)
            base = _weights(torch, model)
            state = {key: value.clone() for key, value in model.state_dict().items()}
            tuned = {}
            for lr in FINE_TUNE_LRS:
                model.load_state_dict(state)
                torch.manual_seed(1)
                _train(torch, model, _teacher(torch, 2), lr, 50)
                tuned[lr] = _weights(torch, model)
    finally:
        torch.set_num_threads(threads)
    return base, tuned


def _adam_ranks(tmp_path, base, tuned):
    """(truth, raw, noise-aware, signal) ranks per layer.

    Truth from NumPy on the float32 update, raw from NumPy on the stored BF16 ΔW.
    """
    names = [f"layers.{index}.weight" for index in range(len(base))]
    stored_base = {name: weight.astype(BF16) for name, weight in zip(names, base, strict=True)}
    stored_tuned = {name: weight.astype(BF16) for name, weight in zip(names, tuned, strict=True)}
    analysis = analyze(*_write_pair(tmp_path, stored_base, stored_tuned))
    plans = _plans(analysis)
    truth, raw, found = [], [], []
    for name, before, after in zip(names, base, tuned, strict=True):
        module = name.removesuffix(".weight")
        truth.append(list(_numpy_ranks(after.astype(np.float64) - before).values()))
        raw.append(
            list(_numpy_ranks(_stored_delta(stored_base[name], stored_tuned[name])).values())
        )
        found.append([plans[preset][module].rank for preset in PRESETS])
        for preset, exact in zip(PRESETS, raw[-1], strict=True):
            raw_rank = plans[preset][module].raw_rank
            assert raw_rank is None or raw_rank >= exact, (module, preset, raw_rank, exact)
    signal = [layer.noise.signal_rank for layer in analysis.layers]
    return np.array(truth), np.array(raw), np.array(found), signal


def test_adam_fine_tune_in_bf16_noise_aware_ranks_are_closer_to_the_update(
    tmp_path, adam_fine_tunes
):
    # lr 1e-5, 50 steps: the update is 0.4-0.8 % of ‖W‖, 10-27 % of BF16 entries unchanged.
    # Measured (layers 64→256, 256→256, 256→32; presets 95/90/85 %):
    #   truth       [30, 23, 19] [55, 25, 16] [23, 18, 15]
    #   raw BF16    [47, 38, 30] [81, 44, 24] [24, 20, 17]   total |error| 101
    #   noise-aware [23, 23, 20] [39, 22, 15] [23, 19, 16]   total |error|  30, r_s 23/52/24
    base, tuned = adam_fine_tunes
    truth, raw, aware, signal = _adam_ranks(tmp_path, base, tuned[1e-5])

    assert np.all(raw >= truth), (raw, truth)  # the noise only ever adds rank
    assert np.all(np.abs(aware - truth) <= np.abs(raw - truth)), (aware, raw, truth)
    assert np.abs(aware - truth).sum() < 0.5 * np.abs(raw - truth).sum(), (aware, raw, truth)
    assert np.all(aware <= np.array(signal)[:, None])


def test_adam_update_at_the_noise_level_is_undercounted_not_overcounted(tmp_path, adam_fine_tunes):
    # lr 3e-6, 50 steps: 0.13-0.25 % of ‖W‖ with 39-63 % of BF16 entries unchanged. In the
    # 64→256 layer σ₁(L) = 0.00381 is level with ‖N‖₂ = 0.00379 (τ = 0.0053): no value of
    # the files' spectrum stands for the update (r_s = 0, flagged unresolved; below the BBP
    # floor no method reads it from the spectrum), and in the 256→32 layer σ₁(L) = 0.0033
    # against ‖N‖₂ = 0.0025 leaves r_s = 8 of a diffuse update. So noise-aware ranks cannot
    # beat the raw ones layer by layer here (they do not in those two layers); what holds is
    # that they stay at or below the update's own rank while the raw ranks overshoot, and
    # that their total error is about half the raw one. Measured:
    #   truth       [30, 23, 19] [54, 25, 16]   [23, 18, 15]
    #   raw BF16    [54, 47, 41] [138, 108, 87] [28, 25, 23]   total |error| 328
    #   noise-aware [0, 0, 0]    [15, 15, 15]   [8, 8, 8]      total |error| 154, r_s 0/15/8
    base, tuned = adam_fine_tunes
    truth, raw, aware, signal = _adam_ranks(tmp_path, base, tuned[3e-6])

    assert np.all(raw >= truth), (raw, truth)
    # At most the documented tolerance max(1, 5 %) above the truth (measured: never above;
    # 15 against 16 at 85 % in the 256→256 layer is the closest).
    assert np.all(aware <= truth + np.maximum(1, np.ceil(0.05 * truth))), (aware, truth)
    assert np.abs(aware - truth).sum() < 0.6 * np.abs(raw - truth).sum(), (aware, raw, truth)
    assert np.all(aware <= np.array(signal)[:, None])


# --- the command line ---------------------------------------------------------------------


def test_cli_recommend_reads_the_planted_rank_and_noise_off_the_raw_one(tmp_path, run_cli):
    weight, update = _planted_pair()
    base, tuned = _stored_pair("both-rounded", weight, update)
    base_path, tuned_path = _write_pair(tmp_path, {"proj.weight": base}, {"proj.weight": tuned})
    raw = _numpy_ranks(_stored_delta(base, tuned))  # 114/61/25

    aware_file, raw_file = tmp_path / "aware.json", tmp_path / "raw.json"
    result = run_cli("diff", base_path, tuned_path, "-o", aware_file, "--format", "json")
    assert result.exit_code == 0, result.stderr
    result = run_cli("recommend", aware_file, "--preset", "balanced", "--format", "json")
    assert result.exit_code == 0, result.stderr
    module = json.loads(result.stdout)["modules"]["proj"]
    assert module["rank"] == TRUTH["balanced"]
    assert module["signal_rank"] == 8
    assert module["raw_rank"] is None or module["raw_rank"] >= raw["balanced"]
    if module["raw_rank"] is None:  # the spectrum stopped at τ: raw 90 % needs a new diff
        result = run_cli(
            "recommend", aware_file, "--preset", "balanced", "--format", "json", "--noise", "off"
        )
        assert_one_line_error(result, "proj", "--noise off")

    result = run_cli("diff", base_path, tuned_path, "-o", raw_file, "--noise", "off")
    assert result.exit_code == 0, result.stderr
    result = run_cli(
        "recommend", raw_file, "--preset", "balanced", "--format", "json", "--noise", "off"
    )
    assert result.exit_code == 0, result.stderr
    module = json.loads(result.stdout)["modules"]["proj"]
    assert module["rank"] == raw["balanced"] > 5 * TRUTH["balanced"]


def test_cli_signal_preset_gives_the_signal_rank_in_json(tmp_path, run_cli):
    weight, update = _planted_pair()
    base, tuned = _stored_pair("both-rounded", weight, update)
    base_path, tuned_path = _write_pair(tmp_path, {"proj.weight": base}, {"proj.weight": tuned})
    analysis_file = tmp_path / "aware.json"
    assert run_cli("diff", base_path, tuned_path, "-o", analysis_file).exit_code == 0

    result = run_cli("recommend", analysis_file, "--preset", "signal", "--format", "json")
    assert result.exit_code == 0, result.stderr
    module = json.loads(result.stdout)["modules"]["proj"]
    assert module["rank"] == module["signal_rank"] == SPIKES.size
