"""The torch kernels (``--device cuda``, run here on torch's CPU device) against the NumPy ones.

Both devices run the same decisions (:func:`svdrank.spectra.engines.decompose`)
on the same sketches (drawn by the host's generator), so they pick the same
engines, stop at the same k and give the same ranks; their values differ by
float32 rounding only. ΔW formed on the device from the stored bytes is the
host's, bit for bit.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import zlib

import ml_dtypes
import numpy as np
import pytest
import scipy.linalg

from svdrank import analyze
from svdrank.analysis import delta as host_forming
from svdrank.analysis.delta import form_delta
from svdrank.errors import NumericalError, UsageError
from svdrank.inputs.checkpoint import open_checkpoint
from svdrank.inputs.pairing import pair_checkpoints
from svdrank.spectra import devices
from svdrank.spectra.energy import rank_at
from svdrank.spectra.engines import decompose
from svdrank.spectra.noise import smallest_variance, square_scale
from svdrank.spectra.signal import clean_spectrum
from svdrank.types import ROUNDING_GRIDS, EngineSettings
from tests.conftest import (
    REPO,
    SAMPLES,
    assert_one_line_error,
    write_checkpoint,
    write_decaying_pair,
)
from tests.spectra import SPECTRA, TARGETS, planted, reference_ranks, spectrum_of

torch = pytest.importorskip("torch")
torch_kernels = pytest.importorskip("svdrank.spectra.torch_kernels")
device_forming = pytest.importorskip("svdrank.analysis.device_delta")

SHAPES = ((600, 400), (400, 600))
ENGINES = {
    "auto": {"engine": "auto"},
    "auto-gram-first": {"engine": "auto", "expect_slow": True},
    "randomized-qr": {"engine": "randomized", "normalizer": "qr"},
    "gram": {"engine": "gram"},
}
SQUARE_TOLERANCE = 1e-5
"""|σ̂ᵢ² − σᵢ²| between the devices, in units of σ₁². Each device's values are backward
stable in float32: an SVD errs by O(ε·σ₁) on σᵢ, the Gram route by O(ε·σ₁²) on σᵢ² (so a
tiny σᵢ has no relative accuracy there), with ε = 2⁻²⁴ ≈ 6e-8 times a modest multiple of
the dimension (400). 1e-5 is ~170 ε; the largest difference measured here is 1.3e-6."""


@functools.cache
def _matrix(kind, shape):
    return planted(shape, spectrum_of(kind, min(shape)), np.float32, seed=zlib.crc32(kind.encode()))


@functools.cache
def _reference(kind, shape):
    return reference_ranks(_matrix(kind, shape))


def _decompose(matrix, kernels, engine="auto", expect_slow=False, **settings):
    spectrum = decompose(
        matrix,
        EngineSettings(engine=engine, **settings),
        np.random.default_rng(0),
        expect_slow=expect_slow,
        kernels=kernels,
    )
    return [rank_at(spectrum, target) for target in TARGETS], spectrum


@pytest.fixture(scope="module")
def torch_cpu():
    return devices.kernels_for("torch-cpu")


def _assert_same_on_both_devices(kind, shape, options, torch_cpu):
    matrix = _matrix(kind, shape)

    host_ranks, host = _decompose(matrix, devices.HOST, **options)
    ranks, spectrum = _decompose(matrix, torch_cpu, **options)

    assert ranks == host_ranks
    assert (spectrum.engine, spectrum.complete) == (host.engine, host.complete)
    assert spectrum.values.dtype == np.float64
    assert spectrum.values.shape == host.values.shape
    scale = host.values[0] ** 2
    np.testing.assert_allclose(
        spectrum.values**2, host.values**2, rtol=0, atol=SQUARE_TOLERANCE * scale
    )
    reference = _reference(kind, shape)
    if spectrum.complete:
        assert ranks == reference
    else:
        assert all(rank >= exact for rank, exact in zip(ranks, reference, strict=True))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", SPECTRA)
def test_torch_gives_the_numpy_ranks_and_values_within_float32_rounding(
    kind, shape, engine, torch_cpu
):
    _assert_same_on_both_devices(kind, shape, ENGINES[engine], torch_cpu)


@pytest.mark.parametrize("engine", ["exact", "lanczos"])
@pytest.mark.parametrize("kind", ["rank-7-plus-noise", "power-1", "power-0.5"])
def test_exact_and_lanczos_engines_agree_across_devices(kind, engine, torch_cpu):
    _assert_same_on_both_devices(kind, SHAPES[1], {"engine": engine}, torch_cpu)


@pytest.mark.parametrize("engine", ["auto", "gram", "randomized"])
def test_zero_update_is_rank_zero_on_torch(engine, torch_cpu):
    ranks, spectrum = _decompose(np.zeros((300, 200), np.float32), torch_cpu, engine)

    assert ranks == [0, 0, 0]
    assert spectrum.values.size == 0


def test_lu_normalisation_is_scipys_permuted_lower_factor():
    block = np.random.default_rng(3).standard_normal((500, 42)).astype(np.float32)

    permuted = torch_kernels._permuted_lower(torch.from_numpy(block)).numpy()

    expected = scipy.linalg.lu(block, permute_l=True)[0]
    np.testing.assert_allclose(permuted, expected, rtol=0, atol=1e-5)


def test_cuda_without_torch_names_the_gpu_extra(monkeypatch):
    monkeypatch.setattr(devices, "_torch_installed", lambda: False)

    with pytest.raises(UsageError, match=r"pip install 'svdrank\[gpu\]'"):
        devices.kernels_for("cuda")
    assert devices.kernels_for("auto") is devices.HOST


def test_auto_picks_cuda_only_when_torch_sees_a_device(monkeypatch):
    monkeypatch.setattr(torch_kernels, "cuda_available", lambda: False)
    assert devices.kernels_for("auto") is devices.HOST
    with pytest.raises(UsageError, match="no CUDA device"):
        devices.kernels_for("cuda")

    monkeypatch.setattr(torch_kernels, "cuda_available", lambda: True)
    assert devices.kernels_for("auto").device == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_diff_on_cuda_without_a_device_is_one_line_error_exit_2(run_cli, tmp_path):
    result = run_cli(
        "diff",
        SAMPLES / "base.safetensors",
        SAMPLES / "tuned.safetensors",
        "--device",
        "cuda",
        "-o",
        tmp_path / "analysis.json",
    )

    assert_one_line_error(result, "--device cuda", "no CUDA device")
    assert not (tmp_path / "analysis.json").exists()


def test_device_does_not_apply_to_an_adapter(run_cli):
    result = run_cli("diff", SAMPLES / "adapter", "--device", "torch-cpu")

    assert_one_line_error(result, "--device")


def test_diff_on_torch_cpu_recommends_the_ranks_of_the_default_run(run_cli, tmp_path):
    tuned = SAMPLES / "tuned-sharded"
    recommended = {}
    for device in ("cpu", "torch-cpu"):
        output = tmp_path / f"{device}.json"
        diff = run_cli("diff", SAMPLES / "base.safetensors", tuned, "--device", device,
                       "-o", output, "--format", "json", "--quiet")  # fmt: skip
        assert diff.exit_code == 0, diff.stderr
        recommend = run_cli("recommend", output, "--format", "json")
        assert recommend.exit_code == 0, recommend.stderr
        recommended[device] = json.loads(recommend.stdout)["modules"]

    assert recommended["torch-cpu"].keys() == recommended["cpu"].keys()
    assert len(recommended["cpu"]) > 20
    for module, host in recommended["cpu"].items():
        ranks = {key: value for key, value in host.items() if key.endswith("rank")}
        assert len(ranks) == 3
        assert {key: recommended["torch-cpu"][module][key] for key in ranks} == ranks
        # Energies are printed to 6 decimals; float32 rounding may move the last one.
        assert recommended["torch-cpu"][module]["energy"] == pytest.approx(host["energy"], abs=2e-6)


def test_the_default_path_never_imports_torch():
    code = (
        "import sys, svdrank.cli, svdrank.analysis.pipeline, svdrank.spectra.engines\n"
        "from svdrank.spectra.devices import kernels_for\n"
        "kernels_for('cpu')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


BF16, F16 = ml_dtypes.bfloat16, np.float16
E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
STORAGES = {
    # name: (base dtype, tuned dtype, the grids form_delta names, weight scale)
    "BF16": (BF16, BF16, ("BF16", "BF16"), 0.02),
    "F16": (F16, F16, ("F16", "F16"), 0.02),
    "F8_E4M3": (E4M3, E4M3, ("F8_E4M3", "F8_E4M3"), 1.0),
    "F8_E5M2": (E5M2, E5M2, ("F8_E5M2", "F8_E5M2"), 1.0),
    "F32-on-BF16-grid": (BF16, BF16, ("BF16", "BF16"), 0.02),
    "F32-base-BF16-tuned": (np.float32, BF16, ("F32", "BF16"), 0.02),
    "F32": (np.float32, np.float32, ("F32", "F32"), 0.02),
    "F64-base-F32-tuned": (np.float64, np.float32, ("F64", "F32"), 0.02),
}
FLOAT64_RTOL = 1e-12
"""The device's sums against float64 references: both square exactly (a float32 value's square
fits a float64) and sum in float64, in different orders, so they differ by a few 2⁻⁵³ times
log₂ of the entries summed (about 1e-15 here); 1e-12 leaves room, and float32 rounding
anywhere (1e-8 and up) would fail it."""
HOST_DOT_RTOL = 2.0**-24
"""The host's ‖ΔW‖² against the device's: BLAS dsdot (see ``sum_of_squares``) may round each
product to float32 before summing in float64, so it is within 2⁻²⁴ relative of the exact sum."""
HOST_BLOCK_RTOL = 1e-5
"""The host's profile sums against the device's: the host sums the squares of each block of
rows in float32 (a column over at most 96 rows here: error ≤ 95·2⁻²⁴ ≈ 6e-6 relative, all
terms non-negative) before adding the blocks in float64; the device sums in float64."""


def _stored_layers(tmp_path, storage, shape=(96, 160), name="proj.weight", seed=0):
    """Write a base/tuned pair stored as ``storage``; return its layers (and the stored arrays)."""
    base_dtype, tuned_dtype, _, scale = STORAGES[storage]
    rng = np.random.default_rng(seed)
    weight = scale * rng.standard_normal(shape)
    update = 0.05 * scale * rng.standard_normal(shape)
    base = weight.astype(base_dtype)
    tuned = (weight + update).astype(tuned_dtype)
    if storage.startswith("F32-on"):
        base, tuned = base.astype(np.float32), tuned.astype(np.float32)
    if base.dtype.itemsize == 1:
        tuned.flat[::7] = base.flat[::7]  # F8 rarely changes a value by chance: some unchanged
    base_file = write_checkpoint(tmp_path / "base.safetensors", {name: base})
    tuned_file = write_checkpoint(tmp_path / "tuned.safetensors", {name: tuned})
    pairing = pair_checkpoints(open_checkpoint(base_file), open_checkpoint(tuned_file), (), ())
    return pairing.layers, base, tuned


def _profile_reference(grids, base, tuned):
    """Energy, row max, column max and entry max of the bounds, summed in float64 from scratch."""
    bounds = np.zeros(base.shape)
    for grid, side in zip(grids, (base, tuned), strict=True):
        if grid in ROUNDING_GRIDS:
            bounds += square_scale(grid) * side.astype(np.float64) ** 2 + smallest_variance(grid)
    rows, columns = bounds.sum(axis=1), bounds.sum(axis=0)
    return float(np.sum(rows)), float(np.max(rows)), float(np.max(columns)), float(bounds.max())


def _assert_device_forms_the_host_delta(layer, base, tuned, torch_cpu):
    host = form_delta(layer, noise=True)
    formed = form_delta(layer, noise=True, kernels=torch_cpu)

    assert isinstance(formed.delta, torch.Tensor)
    assert formed.delta.dtype == torch.from_numpy(host.delta).dtype
    assert formed.host_delta().tobytes() == host.delta.tobytes()
    wide = host.delta.astype(np.float64).ravel()  # ΔW as stored in float32, squared exactly
    assert formed.total_energy == pytest.approx(math.fsum(wide**2), rel=FLOAT64_RTOL)
    assert formed.total_energy == pytest.approx(host.total_energy, rel=HOST_DOT_RTOL)
    reference_base = math.sqrt(math.fsum(base.astype(np.float64).ravel() ** 2))
    assert formed.base_norm == pytest.approx(reference_base, rel=FLOAT64_RTOL)
    assert formed.base_norm == pytest.approx(host.base_norm, rel=HOST_DOT_RTOL)
    if host.rounding is None:
        assert formed.rounding is None
        return
    rounding = formed.rounding
    assert rounding is not None
    assert (rounding.grids, rounding.unchanged) == (host.rounding.grids, host.rounding.unchanged)
    assert rounding.unchanged == int(np.sum(wide == 0.0))
    bounds, host_bounds = rounding.bounds, host.rounding.bounds
    assert (bounds.roundings, bounds.exact) == (host_bounds.roundings, host_bounds.exact)
    sums = (bounds.energy, bounds.row_max, bounds.column_max, bounds.entry_max)
    host_sums = (host_bounds.energy, host_bounds.row_max, host_bounds.column_max,
                 host_bounds.entry_max)  # fmt: skip
    np.testing.assert_allclose(sums, _profile_reference(rounding.grids, base, tuned),
                               rtol=FLOAT64_RTOL)  # fmt: skip
    np.testing.assert_allclose(sums, host_sums, rtol=HOST_BLOCK_RTOL)


@pytest.mark.parametrize("storage", STORAGES)
def test_delta_formed_on_the_device_is_the_host_delta_with_its_sums(storage, tmp_path, torch_cpu):
    layers, base, tuned = _stored_layers(tmp_path, storage)
    expected_grids = STORAGES[storage][2]

    _assert_device_forms_the_host_delta(layers[0], base, tuned, torch_cpu)
    rounding = form_delta(layers[0], True, torch_cpu).rounding
    assert rounding is None or rounding.grids == expected_grids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
@pytest.mark.parametrize("storage", ["BF16", "F8_E4M3", "F32-base-BF16-tuned"])
def test_delta_formed_on_cuda_is_the_host_delta_with_its_sums(storage, tmp_path):
    layers, base, tuned = _stored_layers(tmp_path, storage)

    _assert_device_forms_the_host_delta(layers[0], base, tuned, devices.kernels_for("cuda"))


def test_delta_formed_in_many_chunks_is_the_host_delta(tmp_path, torch_cpu, monkeypatch):
    layers, *_ = _stored_layers(tmp_path, "BF16", shape=(97, 160))
    for module in (host_forming, device_forming):
        monkeypatch.setattr(module, "FORM_CHUNK_BYTES", 10 * 160 * 2)  # 10 rows a chunk

    host = form_delta(layers[0], noise=True)
    formed = form_delta(layers[0], noise=True, kernels=torch_cpu)

    assert formed.host_delta().tobytes() == host.delta.tobytes()
    assert formed.total_energy == pytest.approx(host.total_energy, rel=HOST_DOT_RTOL)
    assert formed.rounding.unchanged == host.rounding.unchanged
    assert formed.rounding.bounds.row_max == pytest.approx(
        host.rounding.bounds.row_max, rel=HOST_BLOCK_RTOL
    )
    assert formed.rounding.bounds.entry_max == pytest.approx(
        host.rounding.bounds.entry_max, rel=HOST_BLOCK_RTOL
    )


def test_each_expert_of_a_fused_tensor_is_formed_on_the_device_as_on_the_host(tmp_path, torch_cpu):
    layers, base, tuned = _stored_layers(
        tmp_path, "BF16", shape=(3, 48, 80), name="model.layers.0.mlp.experts.gate_up_proj"
    )

    assert [layer.part for layer in layers] == [0, 1, 2]
    for layer in layers:
        _assert_device_forms_the_host_delta(layer, base[layer.part], tuned[layer.part], torch_cpu)


@pytest.mark.parametrize("storage", ["BF16", "F32"])
def test_nan_in_a_layer_is_the_host_error_on_the_device(storage, tmp_path, torch_cpu):
    base_dtype = STORAGES[storage][0]
    tuned = np.full((40, 30), 0.5, dtype=base_dtype)
    tuned[7, 3] = np.nan
    base_file = write_checkpoint(tmp_path / "base.safetensors", {"proj.weight": tuned * 0})
    tuned_file = write_checkpoint(tmp_path / "tuned.safetensors", {"proj.weight": tuned})
    layer = pair_checkpoints(open_checkpoint(base_file), open_checkpoint(tuned_file), (), ())
    errors = []
    for kernels in (devices.HOST, torch_cpu):
        with pytest.raises(NumericalError, match=r"proj\.weight") as raised:
            form_delta(layer.layers[0], True, kernels)
        errors.append(str(raised.value))

    assert errors[0] == errors[1]


@pytest.fixture
def sent():
    """Record every array of stored words that forming ΔW sends to the device."""
    sent = []
    send = device_forming.to_device

    def spy(words, device):
        sent.append(words)
        return send(words, device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(device_forming, "to_device", spy)
        yield sent


@pytest.mark.parametrize(("storage", "itemsize"), [("BF16", 2), ("F16", 2), ("F8_E4M3", 1)])
def test_the_stored_bytes_not_float32_are_what_goes_to_the_device(
    storage, itemsize, tmp_path, torch_cpu, sent
):
    layers, base, tuned = _stored_layers(tmp_path, storage)

    formed = form_delta(layers[0], noise=True, kernels=torch_cpu)

    assert {words.itemsize for words in sent} == {itemsize}
    assert sum(words.nbytes for words in sent) == base.nbytes + tuned.nbytes
    assert torch_cpu.place(formed.delta) is formed.delta


def _light_bf16_pair(tmp_path, shape=(320, 256), relative=1e-3):
    """A BF16 pair whose decaying update is light enough that τ needs the full estimate."""
    rng = np.random.default_rng(5)
    weight = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    update = rng.standard_normal(shape) * np.arange(1, shape[1] + 1) ** -1.0
    update *= relative * np.linalg.norm(weight) / np.linalg.norm(update)
    base = write_checkpoint(tmp_path / "base.safetensors", {"proj.weight": weight.astype(BF16)})
    tuned = write_checkpoint(
        tmp_path / "tuned.safetensors", {"proj.weight": (weight + update).astype(BF16)}
    )
    return base, tuned


def _ranks(layer):
    """The noise-aware ranks at the targets, and the raw ones the computed values reach."""
    clean = [rank_at(clean_spectrum(layer), target) for target in TARGETS]
    return clean, [rank_at(layer.spectrum, target) for target in TARGETS if _reaches(layer, target)]


def _reaches(layer, target):
    """Whether a spectrum stopped at τ holds ``target`` of the energy."""
    return float(np.sum(layer.spectrum.values**2)) >= target * layer.spectrum.total_energy


PAIRS = {"decaying-blocks": write_decaying_pair, "light": _light_bf16_pair}


@pytest.mark.parametrize("pair", PAIRS)
def test_analysis_on_torch_cpu_gives_the_host_ranks_and_signal_ranks(pair, tmp_path, sent):
    base, tuned = PAIRS[pair](tmp_path)

    host = analyze(base, tuned, device="cpu")
    assert not sent
    on_device = analyze(base, tuned, device="torch-cpu")

    assert sent, "ΔW was not formed on the device"
    assert len(on_device.layers) == len(host.layers)
    for layer, host_layer in zip(on_device.layers, host.layers, strict=True):
        assert _ranks(layer) == _ranks(host_layer)
        assert (layer.spectrum.engine, layer.spectrum.k) == (
            host_layer.spectrum.engine,
            host_layer.spectrum.k,
        )
        assert layer.noise.signal_rank == host_layer.noise.signal_rank
        assert layer.noise.estimate == host_layer.noise.estimate
        assert layer.base_norm == pytest.approx(host_layer.base_norm, rel=HOST_DOT_RTOL)
    if pair == "light":
        assert on_device.layers[0].noise.estimate == "draws"  # the floor's host copy of ΔW
