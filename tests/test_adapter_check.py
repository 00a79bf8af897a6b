"""PEFT adapters as input, and `svdrank check` exit codes on configs and adapters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from svdrank.analysis.adapter import analyze_adapter, lora_values
from tests.conftest import SAMPLES, assert_one_line_error

ADAPTER = SAMPLES / "adapter"


def _dense_values(b, a, scale):
    return np.linalg.svd(scale * (b.astype(np.float64) @ a.astype(np.float64)), compute_uv=False)


def _write_adapter(directory, tensors, **config):
    directory.mkdir()
    save_file(tensors, directory / "adapter_model.safetensors")
    record = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(record | config))
    return directory


@pytest.mark.parametrize(("m", "n", "r"), [(64, 48, 8), (48, 64, 8), (30, 200, 16), (10, 12, 12)])
def test_lora_values_equal_numpy_svd_of_the_dense_product(m, n, r):
    rng = np.random.default_rng(m * n)
    b, a = rng.standard_normal((m, r)), rng.standard_normal((r, n))

    values = lora_values(b, a, 0.5)

    np.testing.assert_allclose(values, _dense_values(b, a, 0.5)[:r], rtol=1e-10, atol=1e-12)


def test_sample_adapter_spectra_equal_numpy_and_need_rank_4():
    from safetensors.numpy import load_file

    tensors = load_file(ADAPTER / "adapter_model.safetensors")
    analysis = analyze_adapter(ADAPTER)

    assert len(analysis.layers) == 8
    for layer in analysis.layers:
        prefix = f"base_model.model.{layer.module}"
        a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
        reference = _dense_values(b, a, 32 / 16)[:16]
        np.testing.assert_allclose(layer.spectrum.values, reference, rtol=1e-5, atol=1e-9)
        curve = np.cumsum(reference**2) / np.sum(reference**2)
        assert int(np.argmax(curve >= 0.95)) + 1 == 4
        assert layer.shape == (128, 128) and layer.base_norm is None


def test_rslora_rank_and_alpha_patterns_set_each_scale(tmp_path):
    rng = np.random.default_rng(0)
    names = {"q": "base_model.model.layers.1.q_proj", "q11": "base_model.model.layers.11.q_proj"}
    tensors = {}
    for key, rank in (("q", 4), ("q11", 8)):
        tensors[f"{names[key]}.lora_A.weight"] = rng.standard_normal((rank, 16)).astype(np.float32)
        tensors[f"{names[key]}.lora_B.weight"] = rng.standard_normal((24, rank)).astype(np.float32)
    directory = _write_adapter(
        tmp_path / "adapter",
        tensors,
        use_rslora=True,
        rank_pattern={"layers.1.q_proj": 4},
        alpha_pattern={"layers.1.q_proj": 2},
    )

    layers = {layer.module: layer for layer in analyze_adapter(directory).layers}

    for key, rank, alpha in (("q", 4, 2.0), ("q11", 8, 16.0)):
        b = tensors[f"{names[key]}.lora_B.weight"]
        a = tensors[f"{names[key]}.lora_A.weight"]
        module = names[key].removeprefix("base_model.model.")
        expected = _dense_values(b, a, alpha / math.sqrt(rank))[:rank]
        np.testing.assert_allclose(layers[module].spectrum.values, expected, rtol=1e-5)


def test_embedding_lora_is_analysed_in_the_weights_orientation(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 50)).astype(np.float32)  # r x num_embeddings
    b = rng.standard_normal((16, 4)).astype(np.float32)  # embedding_dim x r
    prefix = "base_model.model.model.embed_tokens"
    directory = _write_adapter(
        tmp_path / "adapter",
        {f"{prefix}.lora_embedding_A": a, f"{prefix}.lora_embedding_B": b},
        r=4,
        lora_alpha=4,
    )

    (layer,) = analyze_adapter(directory).layers

    assert layer.shape == (50, 16) and layer.role == "embedding"
    np.testing.assert_allclose(layer.spectrum.values, _dense_values(b, a, 1.0)[:4], rtol=1e-5)


def test_adapter_with_a_missing_half_is_one_line_error(tmp_path, run_cli):
    directory = _write_adapter(
        tmp_path / "adapter", {"base_model.model.q_proj.lora_A.weight": np.ones((2, 4), np.float32)}
    )

    assert_one_line_error(run_cli("diff", directory, "-o", tmp_path / "a.json"), "lora_A or lora_B")


def test_diff_of_an_adapter_alone_writes_an_analysis(tmp_path, run_cli):
    out = tmp_path / "a.json"

    result = run_cli("diff", ADAPTER, "-o", out, "--format", "json")

    assert result.exit_code == 0, result.stderr
    record = json.loads(out.read_text())
    assert {layer["engine"] for layer in record["layers"]} == {"lora"}
    ranks = json.loads(run_cli("recommend", out, "--preset", "conservative").stdout)["modules"]
    assert {item["rank"] for item in ranks.values()} == {4}


def test_single_checkpoint_without_an_adapter_is_one_line_error(run_cli, tmp_path):
    result = run_cli("diff", SAMPLES / "base.safetensors", "-o", tmp_path / "a.json")

    assert_one_line_error(result, "give BASE and TUNED")


@pytest.fixture
def sample_analysis(tmp_path, run_cli):
    out = tmp_path / "analysis.json"
    run_cli("diff", SAMPLES / "base.safetensors", SAMPLES / "tuned.safetensors", "-o", out)
    return out


def _balanced(run_cli, analysis, tmp_path, fmt):
    path = tmp_path / f"ranks-{fmt}.json"
    run_cli("recommend", analysis, "--preset", "balanced", "--format", fmt, "-o", path)
    return path, json.loads(run_cli("recommend", analysis, "--preset", "balanced").stdout)


@pytest.mark.parametrize("fmt", ["json", "peft"])
def test_check_params_over_and_under_the_limit(tmp_path, run_cli, sample_analysis, fmt):
    path, native = _balanced(run_cli, sample_analysis, tmp_path, fmt)
    params = native["totals"]["params"]
    shapes = ("--analysis", sample_analysis) if fmt == "peft" else ()

    under = run_cli("check", path, "--max-params", str(params), *shapes)
    over = run_cli("check", path, "--max-params", str(params - 1), *shapes, "--format", "json")

    assert under.exit_code == 0 and under.stdout.startswith("svdrank check: PASS")
    assert over.exit_code == 1
    violation = json.loads(over.stdout)["violations"][0]
    assert violation == {
        "module": "(total)",
        "limit": "max-params",
        "value": params,
        "bound": params - 1,
    }


@pytest.mark.parametrize("fmt", ["json", "peft"])
def test_check_max_rank_lists_each_module_over_it(tmp_path, run_cli, sample_analysis, fmt):
    path, native = _balanced(run_cli, sample_analysis, tmp_path, fmt)
    ranks = {name: item["rank"] for name, item in native["modules"].items() if item["rank"]}

    result = run_cli("check", path, "--max-rank", "10", "--format", "json")

    assert result.exit_code == 1
    flagged = {v["module"]: v["value"] for v in json.loads(result.stdout)["violations"]}
    assert flagged == {name: rank for name, rank in ranks.items() if rank > 10}
    assert run_cli("check", path, "--max-rank", str(max(ranks.values()))).exit_code == 0


def test_check_min_energy_uses_the_analysis(tmp_path, run_cli, sample_analysis):
    path, _ = _balanced(run_cli, sample_analysis, tmp_path, "json")

    assert (
        run_cli("check", path, "--min-energy", "0.9", "--analysis", sample_analysis).exit_code == 0
    )
    result = run_cli("check", path, "--min-energy", "0.95", "--analysis", sample_analysis)
    assert result.exit_code == 1
    assert "min-energy" in result.stdout


def test_check_adapter_reads_real_ranks_and_shapes(run_cli):
    passed = run_cli("check", ADAPTER, "--max-params", "32768", "--max-rank", "16")
    failed = run_cli(
        "check", ADAPTER / "adapter_config.json", "--max-rank", "8", "--format", "json"
    )

    assert passed.exit_code == 0
    assert "8 modules, 32,768 LoRA parameters" in passed.stdout  # 8 x 16 x (128 + 128)
    assert failed.exit_code == 1
    assert len(json.loads(failed.stdout)["violations"]) == 8


def test_check_adapter_min_energy_against_its_own_analysis(tmp_path, run_cli):
    out = tmp_path / "adapter-analysis.json"
    run_cli("diff", ADAPTER, "-o", out)

    assert run_cli("check", ADAPTER, "--min-energy", "0.99", "--analysis", out).exit_code == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), "give at least one limit"),
        (("--min-energy", "0.9"), "needs --analysis"),
        (("--max-params", "many"), "is not a count"),
    ],
)
def test_check_bad_usage_is_exit_2(tmp_path, run_cli, sample_analysis, args, words):
    path, _ = _balanced(run_cli, sample_analysis, tmp_path, "json")

    assert_one_line_error(run_cli("check", path, *args), words)


def test_check_peft_config_without_shapes_needs_an_analysis(tmp_path, run_cli, sample_analysis):
    path, _ = _balanced(run_cli, sample_analysis, tmp_path, "peft")

    assert_one_line_error(run_cli("check", path, "--max-params", "1M"), "give --analysis")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{ nope", "not a readable rank config"),
        ("[1]", "the JSON is not an object"),
        ('{"a": 1}', "neither a svdrank rank config"),
    ],
)
def test_check_bad_target_is_exit_2(tmp_path, run_cli, content, words):
    path = tmp_path / "config.json"
    path.write_text(content)

    assert_one_line_error(run_cli("check", path, "--max-rank", "8"), words)


def test_check_short_peft_target_names_expand_with_the_analysis(tmp_path, run_cli, sample_analysis):
    config = tmp_path / "lora.json"
    config.write_text(
        json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    )

    result = run_cli(
        "check", config, "--max-params", "1M", "--analysis", sample_analysis, "--format", "json"
    )

    totals = json.loads(result.stdout)["totals"]
    assert totals["modules"] == 8  # q_proj and v_proj of 4 blocks
    assert totals["params"] == 8 * 8 * (128 + 128)
