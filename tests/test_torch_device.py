"""The torch kernels (``--device cuda``, run here on torch's CPU device) against the NumPy ones.

Both devices run the same decisions (:func:`svdrank.spectra.engines.decompose`)
on the same sketches (drawn by the host's generator), so they pick the same
engines, stop at the same k and give the same ranks; their values differ by
float32 rounding only.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import zlib

import numpy as np
import pytest
import scipy.linalg

from svdrank.errors import UsageError
from svdrank.spectra import devices
from svdrank.spectra.energy import rank_at
from svdrank.spectra.engines import decompose
from svdrank.types import EngineSettings
from tests.conftest import REPO, SAMPLES, assert_one_line_error
from tests.spectra import SPECTRA, TARGETS, planted, reference_ranks, spectrum_of

torch = pytest.importorskip("torch")
torch_kernels = pytest.importorskip("svdrank.spectra.torch_kernels")

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
