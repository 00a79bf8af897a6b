"""Whole flows through the real command line (diff → recommend / plot) and the library.

Every rank is checked against NumPy's exact SVD of the ΔW stored in the files, read back
by the safetensors library (and torch for BF16), never against svdrank's own numbers.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch
from typer.testing import CliRunner

import svdrank
from svdrank.cli import app
from tests.conftest import REPO, SAMPLES, assert_one_line_error, write_checkpoint
from tests.spectra import planted

BASE = SAMPLES / "base.safetensors"
TUNED = SAMPLES / "tuned.safetensors"
ADAPTER = SAMPLES / "adapter"


def _invoke(*args):
    """Run the CLI from a module-scoped fixture (run_cli is per test)."""
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def _fro_rank(sigma: np.ndarray, target: float) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ target·Σσᵢ², in float64; 0 for a zero update."""
    if not sigma.any():
        return 0
    curve = np.cumsum(sigma.astype(np.float64) ** 2) / np.sum(sigma.astype(np.float64) ** 2)
    return int(np.argmax(curve >= target)) + 1


@functools.cache
def _sample_sigmas() -> dict[str, np.ndarray]:
    """Singular values of every sample layer's ΔW (BF16 decoded by torch), by module."""
    base, tuned = load_torch(BASE), load_torch(TUNED)
    sigmas = {}
    for name, weight in base.items():
        other = tuned[name]
        if weight.ndim != 2 or not weight.is_floating_point() or weight.shape != other.shape:
            continue
        delta = (other.to(torch.float64) - weight.to(torch.float64)).numpy()
        sigmas[name.removesuffix(".weight")] = np.linalg.svd(delta, compute_uv=False)
    return sigmas


def _ranks(record: dict) -> dict[str, int]:
    return {module: item["rank"] for module, item in record["modules"].items()}


@pytest.fixture(scope="module")
def sample_analysis(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "analysis.json"
    _invoke("diff", BASE, TUNED, "-o", path, "--quiet", "--format", "json")
    return path


# --- 1a: an analysis truncated below the conservative preset -------------------------------

BIG = "model.layers.0.mlp.up_proj"
SMALL = "model.layers.1.self_attn.q_proj"
HEAD_SHARES = 0.92 * 0.6 ** np.arange(8) / np.sum(0.6 ** np.arange(8))
"""σᵢ² / ‖ΔW‖_F² of the 8 strong directions: E(k) = 0.374, 0.599, 0.734, 0.814, 0.863, 0.892,
0.9095, 0.92, so r@85% = 5 and r@90% = 7 by hand; the other 376 share 8 % evenly (a floor)."""


def _head_and_floor() -> np.ndarray:
    """Singular values whose first 32 hold 92.5 %: a first sketch of k = 32 stops below 95 %."""
    return np.sqrt(np.concatenate([HEAD_SHARES, np.full(376, 0.08 / 376)]))


def _truncated_pair(directory: Path, big_sigma: np.ndarray) -> tuple[Path, Path]:
    rng = np.random.default_rng(20261123)
    updates = {
        BIG: planted((512, 384), big_sigma, seed=1),
        SMALL: planted((64, 48), 0.5 ** np.arange(48), seed=2),
    }
    base = {
        f"{m}.weight": (0.02 * rng.standard_normal(u.shape)).astype(np.float32)
        for m, u in updates.items()
    }
    tuned = {
        f"{m}.weight": (base[f"{m}.weight"] + u).astype(np.float32) for m, u in updates.items()
    }
    return (
        write_checkpoint(directory / "base.safetensors", base),
        write_checkpoint(directory / "tuned.safetensors", tuned),
    )


def _diff_at_90(pair, analysis: Path):
    return CliRunner().invoke(
        app,
        ["diff", *map(str, pair), "--max-energy", "0.9", "--format", "table", "-o", str(analysis)],
    )


@pytest.fixture(scope="module")
def truncated(tmp_path_factory):
    """A pair whose 512×384 layer is sketched (auto → randomized), diffed at --max-energy 0.9.

    Its first sketch (k = 32) already holds 90 % but not 95 %: the analysis answers
    the balanced and aggressive presets, not the conservative one.
    """
    directory = tmp_path_factory.mktemp("truncated")
    pair = _truncated_pair(directory, _head_and_floor())
    analysis = directory / "analysis.json"
    result = _diff_at_90(pair, analysis)
    return {"pair": pair, "analysis": analysis, "result": result, "directory": directory}


def _truncated_sigmas(truncated) -> dict[str, np.ndarray]:
    base, tuned = (load_numpy(path) for path in truncated["pair"])
    return {
        name.removesuffix(".weight"): np.linalg.svd(
            tuned[name].astype(np.float64) - base[name].astype(np.float64), compute_uv=False
        )
        for name in base
    }


def _table_column(stdout: str, header: str) -> dict[str, str]:
    """One column of the layer table (the first Rich table on stdout), by module."""
    lines = stdout.splitlines()
    heading = next(line for line in lines if "┃" in line and "module" in line)
    index = [cell.strip() for cell in heading.split("┃")].index(header)
    column = {}
    for line in lines[lines.index(heading) + 1 :]:
        if line.startswith("└"):
            break
        if line.startswith("│"):
            cells = [cell.strip() for cell in line.split("│")]
            column[cells[1]] = cells[index]
    return column


def test_max_energy_below_95_percent_diff_shows_only_answerable_targets(truncated):
    result = truncated["result"]

    assert result.exit_code == 0, result.stderr
    assert truncated["analysis"].is_file()
    heading = next(line for line in result.stdout.splitlines() if "r@" in line)
    assert "r@90%" in heading and "r@85%" in heading and "r@95%" not in heading
    layers = {
        item["module"]: item for item in json.loads(truncated["analysis"].read_text())["layers"]
    }
    assert (layers[BIG]["engine"], layers[BIG]["complete"]) == ("randomized", False)
    assert json.loads(truncated["analysis"].read_text())["settings"]["max_energy"] == 0.9


def test_max_energy_table_ranks_equal_numpy_exact_svd(truncated):
    sigmas = _truncated_sigmas(truncated)

    for header, target in (("r@90%", 0.90), ("r@85%", 0.85)):
        shown = _table_column(truncated["result"].stdout, header)
        # Both targets fall in the strong head, far above the floor: the sketch's values
        # there are exact to many digits, so the ranks equal the exact ones, not just bound them.
        assert {module: int(rank) for module, rank in shown.items()} == {
            module: _fro_rank(sigma, target) for module, sigma in sigmas.items()
        }
    assert (_fro_rank(sigmas[BIG], 0.85), _fro_rank(sigmas[BIG], 0.90)) == (5, 7)  # by hand


def test_max_energy_recommend_writes_the_balanced_plan(truncated, run_cli):
    result = run_cli("recommend", truncated["analysis"], "--format", "json")

    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["rule"], record["preset"], record["energy_target"]) == (
        "energy",
        "balanced",
        0.9,
    )
    sigmas = _truncated_sigmas(truncated)
    assert _ranks(record) == {module: _fro_rank(s, 0.9) for module, s in sigmas.items()}
    assert result.stderr.strip() == "svdrank: no rule given: writing the balanced plan (0.90)"


def test_max_energy_recommend_refuses_a_target_above_it(truncated, run_cli):
    result = run_cli("recommend", truncated["analysis"], "--preset", "conservative")

    assert_one_line_error(result, "--max-energy")


def test_truncated_spectrum_that_reaches_95_percent_answers_it_everywhere(tmp_path, run_cli):
    """σᵢ = 0.7ⁱ: the first 32 sketched values hold ~100 %, so 95 % is answerable (and exact)."""
    pair = _truncated_pair(tmp_path, 0.7 ** np.arange(384))
    analysis = tmp_path / "analysis.json"

    table = _diff_at_90(pair, analysis)
    ranks = run_cli("recommend", analysis, "--preset", "conservative", "--format", "json")

    assert table.exit_code == 0 and ranks.exit_code == 0, (table.stderr, ranks.stderr)
    sigmas = _truncated_sigmas({"pair": pair})
    expected = {module: _fro_rank(sigma, 0.95) for module, sigma in sigmas.items()}
    assert expected[BIG] == 5  # 1 − 0.49⁴ = 0.942 < 0.95 ≤ 1 − 0.49⁵ = 0.972, by hand
    shown = _table_column(table.stdout, "r@95%")
    assert (
        {module: int(rank) for module, rank in shown.items()}
        == expected
        == _ranks(json.loads(ranks.stdout))
    )
    layers = {item["module"]: item for item in json.loads(analysis.read_text())["layers"]}
    assert (layers[BIG]["engine"], layers[BIG]["complete"]) == ("randomized", False)


def test_max_energy_plot_writes_figures_without_a_conservative_heat_map(
    truncated, run_cli, tmp_path
):
    folder = tmp_path / "figures"

    result = run_cli("plot", truncated["analysis"], "-o", folder)

    assert result.exit_code == 0, result.stderr
    names = {
        "energy-curves.png",
        "singular-values.png",
        "rank-heatmap-balanced.png",
        "rank-heatmap-aggressive.png",
        "budget.png",
    }
    assert {path.name for path in folder.iterdir()} == names
    assert {Path(line).name for line in result.stdout.splitlines()} == names
    assert all((folder / name).read_bytes().startswith(b"\x89PNG") for name in names)


# --- 1b: an adapter takes only --metric, --include and --exclude -----------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--engine", "lanczos"), "--engine"),
        (("--seed", "3"), "--seed"),
        (("--workers", "2"), "--workers"),
        (("--resume",), "--resume"),
    ],
)
def test_adapter_refuses_options_it_cannot_honour(run_cli, tmp_path, args, option):
    out = tmp_path / "a.json"

    result = run_cli("diff", ADAPTER, *args, "-o", out)

    assert_one_line_error(result, option, "PEFT adapter")
    assert not out.exists()


def test_adapter_honours_metric_and_include(run_cli, tmp_path):
    out = tmp_path / "a.json"

    result = run_cli("diff", ADAPTER, "--metric", "nuclear", "--include", "*q_proj*", "-o", out)

    assert result.exit_code == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["settings"]["metric"] == "nuclear"
    assert record["settings"]["include"] == ["*q_proj*"]
    assert [layer["module"] for layer in record["layers"]] == [
        f"model.layers.{block}.self_attn.q_proj" for block in range(4)
    ]
    assert {item["reason"] for item in record["skipped"]} == {"excluded"}
    assert all("v_proj" in item["name"] for item in record["skipped"])
    assert len(record["skipped"]) == 4


# --- 1c: rank config fields and option combinations -------------------------------------------


def test_sv_ratio_record_names_its_rule_and_value(sample_analysis, run_cli):
    result = run_cli("recommend", sample_analysis, "--sv-ratio", "4", "--format", "json")

    record = json.loads(result.stdout)
    assert record["schema"] == "svdrank.ranks/2"
    assert (record["rule"], record["sv_ratio"], record["energy_target"]) == ("sv_ratio", 4.0, None)
    assert record["preset"] is None and record["threshold"] is None and record["budget"] is None
    assert _ranks(record) == {
        module: int(np.sum(sigma >= sigma[0] / 4)) if sigma.any() else 0
        for module, sigma in _sample_sigmas().items()
    }


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--budget", "1M", "--metric", "nuclear"), ("nuclear", "--budget")),
        (("--objective", "relative"), ("--objective",)),
        (("--alpha-ratio", "3", "--format", "json"), ("--alpha-ratio",)),
    ],
)
def test_options_that_do_not_combine_are_one_line_errors(sample_analysis, run_cli, args, words):
    assert_one_line_error(run_cli("recommend", sample_analysis, *args), *words)


@pytest.fixture(scope="module")
def nuclear_analysis(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nuclear") / "analysis.json"
    _invoke("diff", BASE, TUNED, "-o", path, "--metric", "nuclear", "--quiet", "--format", "json")
    return path


def test_nuclear_totals_weigh_module_energies_by_nuclear_norms(nuclear_analysis, run_cli):
    result = run_cli("recommend", nuclear_analysis, "--energy", "0.9", "--format", "json")

    record = json.loads(result.stdout)
    assert record["metric"] == "nuclear"
    sigmas = _sample_sigmas()
    modules = record["modules"]
    assert set(modules) == set(sigmas)
    for module, sigma in sigmas.items():
        rank = modules[module]["rank"]
        kept = 1.0 if not sigma.any() else np.sum(sigma[:rank]) / np.sum(sigma)
        assert modules[module]["energy"] == pytest.approx(kept, abs=1e-6)
    norms = {module: float(np.sum(sigma)) for module, sigma in sigmas.items()}
    total = sum(modules[m]["energy"] * norms[m] for m in norms) / sum(norms.values())
    assert record["totals"]["energy"] == pytest.approx(round(total, 6), abs=1e-6)


# --- 1d: parser errors are one line ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("diff", "--nope"), ("--nope",)),
        (("recommend", "--preset", "greedy"), ("--preset", "greedy")),
        (("diff",), ("Missing argument",)),
        (("recommend", "--energy", "abc"), ("--energy", "valid number")),
    ],
)
def test_parser_errors_are_one_line_exit_2(run_cli, args, words):
    result = run_cli(*args)

    assert_one_line_error(result, *words)
    assert "Usage:" not in result.stderr and "Try " not in result.stderr
    assert result.stdout == ""


# --- 2a: the analysis file round trip through the library --------------------------------------


def test_saved_and_loaded_analysis_equals_the_original(tmp_path):
    original = svdrank.analyze(BASE, TUNED)

    loaded = svdrank.load_analysis(svdrank.save_analysis(original, tmp_path / "a.json"))

    assert loaded.settings == original.settings
    assert loaded.skipped == original.skipped
    assert loaded.inputs == original.inputs
    assert len(loaded.layers) == len(original.layers) == 29
    for back, layer in zip(loaded.layers, original.layers, strict=True):
        identity = ("module", "name", "shape", "kind", "block", "role", "dtype")
        assert [getattr(back, f) for f in identity] == [getattr(layer, f) for f in identity]
        np.testing.assert_array_equal(back.spectrum.values, layer.spectrum.values)
        assert back.spectrum.total_energy == layer.spectrum.total_energy
        assert (back.spectrum.complete, back.spectrum.engine) == (
            layer.spectrum.complete,
            layer.spectrum.engine,
        )
        assert (back.delta_norm, back.base_norm) == (layer.delta_norm, layer.base_norm)
    for again, plan in zip(svdrank.recommend(loaded), svdrank.recommend(original), strict=True):
        assert [item.rank for item in again.layers] == [item.rank for item in plan.layers]
        assert again.energy == plan.energy


# --- 2b: the version -----------------------------------------------------------------------------


def test_version_is_the_package_version(run_cli):
    result = run_cli("--version")

    assert result.exit_code == 0
    assert result.stdout == f"svdrank {svdrank.__version__}\n"


def test_python_dash_m_prints_the_same_version():
    result = subprocess.run(
        [sys.executable, "-m", "svdrank", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )

    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"svdrank {svdrank.__version__}\n",
        "",
    )


# --- 2c: an error in one layer while other layers decompose --------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
    }


def _svdrank_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("svdrank-")]


def test_nan_in_a_middle_layer_with_workers_is_one_line_and_leaves_nothing(tmp_path, run_cli):
    rng = np.random.default_rng(3)
    base = {
        f"layers.{i}.proj.weight": rng.standard_normal((300, 200)).astype(np.float32)
        for i in range(6)
    }
    tuned = {
        name: weight + planted(weight.shape, 0.8 ** np.arange(200), np.float32, seed=i)
        for i, (name, weight) in enumerate(base.items())
    }
    tuned["layers.3.proj.weight"][100, 7] = np.nan
    pair = (
        write_checkpoint(tmp_path / "b.safetensors", base),
        write_checkpoint(tmp_path / "t.safetensors", tuned),
    )
    before = _snapshot(tmp_path)

    result = run_cli("diff", *pair, "--workers", "2", "-o", tmp_path / "out.json")

    assert_one_line_error(result, "layers.3.proj.weight", "NaN or Inf")
    assert _snapshot(tmp_path) == before
    deadline = time.monotonic() + 5.0
    for thread in _svdrank_threads():
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert _svdrank_threads() == []


# --- 2d: conv kernels --------------------------------------------------------------------------


@pytest.fixture
def conv_pair(tmp_path):
    """A 64×32×3×3 kernel with a rank-2 update (σ = 4, 1 as a 64×288 matrix), and a linear layer."""
    rng = np.random.default_rng(5)
    update = planted((64, 288), np.array([4.0, 1.0]), seed=6).reshape(64, 32, 3, 3)
    kernel = (0.02 * rng.standard_normal((64, 32, 3, 3))).astype(np.float32)
    linear = (0.02 * rng.standard_normal((16, 16))).astype(np.float32)
    base = {"down.0.conv.weight": kernel, "down.0.proj.weight": linear}
    tuned = {
        "down.0.conv.weight": (kernel + update).astype(np.float32),
        "down.0.proj.weight": linear + np.float32(0.1) * np.eye(16, dtype=np.float32),
    }
    return (
        write_checkpoint(tmp_path / "b.safetensors", base),
        write_checkpoint(tmp_path / "t.safetensors", tuned),
    )


def test_conv_kernels_are_skipped_without_include_conv(conv_pair, run_cli, tmp_path):
    out = tmp_path / "a.json"

    result = run_cli("diff", *conv_pair, "-o", out)

    assert result.exit_code == 0, result.stderr
    record = json.loads(out.read_text())
    assert [layer["module"] for layer in record["layers"]] == ["down.0.proj"]
    assert record["skipped"] == [
        {"name": "down.0.conv.weight", "reason": "conv", "detail": "[64, 32, 3, 3]"}
    ]


def test_include_conv_analyses_the_kernel_as_out_by_in_kh_kw(conv_pair, run_cli, tmp_path):
    out = tmp_path / "a.json"
    base, tuned = (load_numpy(path)["down.0.conv.weight"] for path in conv_pair)
    delta = (tuned.astype(np.float64) - base.astype(np.float64)).reshape(64, 288)
    sigma = np.linalg.svd(delta, compute_uv=False)

    result = run_cli("diff", *conv_pair, "--include-conv", "-o", out)
    ranks = run_cli("recommend", out, "--preset", "conservative", "--format", "json")

    assert result.exit_code == 0, result.stderr
    record = json.loads(out.read_text())
    layer = next(item for item in record["layers"] if item["module"] == "down.0.conv")
    assert (layer["shape"], layer["role"]) == ([64, 288], "conv")
    assert record["skipped"] == []
    np.testing.assert_allclose(layer["singular_values"][:3], sigma[:3], rtol=1e-5, atol=1e-5)
    assert _ranks(json.loads(ranks.stdout))["down.0.conv"] == _fro_rank(sigma, 0.95) == 2


# --- 2f: import laziness -----------------------------------------------------------------------


def _loaded_after(statement: str, watched: tuple[str, ...]) -> list[str]:
    script = (
        f"import sys\n{statement}\n"
        f"print(sorted({{name.split('.')[0] for name in sys.modules}} & {set(watched)!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout.replace("'", '"'))


def test_reading_and_recommending_never_import_scipy_or_matplotlib():
    statement = (
        "import svdrank, svdrank.ranks.rules, svdrank.analysis.file, svdrank.outputs.configs, "
        "svdrank.outputs.formats, svdrank.cli"
    )

    assert _loaded_after(statement, ("scipy", "matplotlib")) == []


def test_value_types_import_neither_scipy_nor_ml_dtypes():
    assert _loaded_after("import svdrank.types", ("scipy", "ml_dtypes", "matplotlib")) == []
