"""PEFT configs that apply to the model transformers builds: unmatched modules, check --model.

The pairs are tiny random Hugging Face folders (config.json + model.safetensors)
with a planted rank-3 update in every matrix (see tests/test_naming.py). The
judge of "applies" is the real PEFT on the real model class.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from svdrank.analysis.file import load_analysis
from svdrank.ranks.checks import check_allocation
from svdrank.types import Allocation, ModuleRank
from tests.conftest import assert_one_line_error
from tests.test_naming import plant_pair

EXTRA = "adapter_probe.proj.weight"
"""A matrix in the checkpoint that no module of the model holds."""


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return plant_pair("vit", tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def vit_with_extra(tmp_path_factory):
    extra = {EXTRA: np.random.default_rng(3).standard_normal((16, 16)).astype(np.float32)}
    return plant_pair("vit", tmp_path_factory.mktemp("vit-extra"), extra)


def _diff(run_cli, pair, folder):
    result = run_cli("diff", pair.base, pair.tuned, "-o", folder / "a.json", "--format", "json")
    assert result.exit_code == 0, result.stderr
    return result


def _peft_config(run_cli, folder, *extra):
    return run_cli(
        "recommend", folder / "a.json", "--format", "peft", "--preset", "balanced", *extra
    )


def test_analysis_records_the_model_and_each_layers_runtime_target(run_cli, vit, tmp_path):
    _diff(run_cli, vit, tmp_path)
    analysis = load_analysis(tmp_path / "a.json")

    assert analysis.model is not None
    assert (analysis.model.model_type, analysis.model.architecture) == (
        "vit",
        "ViTForImageClassification",
    )
    targets = {layer.module: layer.target for layer in analysis.layers}
    query = targets["vit.encoder.layer.0.attention.attention.query"]
    assert (query.name, query.module_type) == ("vit.layers.0.attention.q_proj", "Linear")
    assert targets["vit.encoder.layer.1.output.dense"].name == "vit.layers.1.mlp.fc2"


def test_module_the_model_lacks_is_refused_in_one_line_unless_allowed(
    run_cli, vit_with_extra, tmp_path
):
    diffed = _diff(run_cli, vit_with_extra, tmp_path)
    assert (
        "svdrank: warning: 1 of" in diffed.stderr and EXTRA.removesuffix(".weight") in diffed.stderr
    )

    refused = _peft_config(run_cli, tmp_path)
    assert_one_line_error(refused, "--allow-unmatched")
    assert refused.stdout == ""

    allowed = _peft_config(run_cli, tmp_path, "--allow-unmatched")
    assert allowed.exit_code == 0, allowed.stderr
    record = json.loads(allowed.stdout)
    assert EXTRA.removesuffix(".weight") not in record["target_modules"]
    assert "vit.layers.0.attention.q_proj" in record["target_modules"]
    assert "left out" in allowed.stderr


def test_allow_unmatched_applies_to_peft_configs_only(run_cli, vit, tmp_path):
    _diff(run_cli, vit, tmp_path)
    result = run_cli("recommend", tmp_path / "a.json", "--format", "json", "--allow-unmatched")
    assert_one_line_error(result, "--allow-unmatched applies to --format peft only")


def test_without_transformers_names_stay_the_checkpoints_with_a_warning(
    run_cli, vit, tmp_path, monkeypatch
):
    monkeypatch.setattr("svdrank.inputs.model.transformers_version", lambda: None)
    diffed = _diff(run_cli, vit, tmp_path)
    assert "svdrank: warning:" in diffed.stderr and "transformers is not installed" in diffed.stderr
    analysis = load_analysis(tmp_path / "a.json")
    assert analysis.model is not None and analysis.model.transformers is None
    assert all(layer.target is None for layer in analysis.layers)

    record = json.loads(_peft_config(run_cli, tmp_path).stdout)
    assert "vit.encoder.layer.0.attention.attention.query" in record["target_modules"]


def test_check_model_passes_the_config_svdrank_wrote(run_cli, vit, tmp_path):
    _diff(run_cli, vit, tmp_path)
    (tmp_path / "peft.json").write_text(_peft_config(run_cli, tmp_path).stdout)

    result = run_cli("check", tmp_path / "peft.json", "--model", vit.base)

    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith("svdrank check: PASS")


def test_check_model_fails_a_config_keyed_by_checkpoint_names(run_cli, vit, tmp_path):
    # ViT's checkpoint names: transformers renames them at load, so PEFT adapts only the
    # modules whose names survive (the patch embedding and pooler keep theirs).
    config = {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": [
            "vit.encoder.layer.0.attention.attention.query",
            "vit.encoder.layer.1.intermediate.dense",
        ],
        "rank_pattern": {},
    }
    (tmp_path / "peft.json").write_text(json.dumps(config))

    result = run_cli("check", tmp_path / "peft.json", "--model", vit.base, "--format", "json")

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert [(v["module"], v["limit"], v["value"], v["bound"]) for v in report["violations"]] == [
        ("vit.encoder.layer.0.attention.attention.query", "model", 0, 2),
        ("vit.encoder.layer.1.intermediate.dense", "model", 0, 2),
    ]


def test_model_violation_for_each_module_not_adapted_or_adapted_at_another_rank():
    allocation = Allocation(
        "peft.json",
        "peft-config",
        (
            ModuleRank("model.layers.0.q_proj", 4, None),
            ModuleRank("model.layers.0.k_proj", 2, None),
            ModuleRank("model.layers.0.mlp.experts.gate_up_proj", 6, None),
        ),
    )
    adapted = {"model.layers.0.q_proj": 4, "model.layers.0.mlp.experts.gate_up_proj": 3}

    report = check_allocation(allocation, adapted=adapted)

    assert [(v.module, v.limit, v.value, v.bound) for v in report.violations] == [
        ("model.layers.0.k_proj", "model", 0, 2),
        ("model.layers.0.mlp.experts.gate_up_proj", "model", 3, 6),
    ]


def test_check_model_refuses_a_native_rank_config(run_cli, vit, tmp_path):
    _diff(run_cli, vit, tmp_path)
    run_cli("recommend", tmp_path / "a.json", "-o", tmp_path / "ranks.json")
    result = run_cli("check", tmp_path / "ranks.json", "--model", vit.base)
    assert_one_line_error(result, "--format peft")


def test_check_model_needs_a_config_json(run_cli, vit, tmp_path):
    _diff(run_cli, vit, tmp_path)
    (tmp_path / "peft.json").write_text(_peft_config(run_cli, tmp_path).stdout)
    result = run_cli("check", tmp_path / "peft.json", "--model", tmp_path)
    assert_one_line_error(result, "no config.json")


def test_analysis_without_model_or_targets_reads_as_checkpoint_names(run_cli, vit, tmp_path):
    # Files written before the two fields were added (same schema: fields only added).
    _diff(run_cli, vit, tmp_path)
    record = json.loads((tmp_path / "a.json").read_text())
    del record["model"]
    for layer in record["layers"]:
        del layer["target"]
    (tmp_path / "old.json").write_text(json.dumps(record))

    analysis = load_analysis(tmp_path / "old.json")

    assert analysis.model is None
    assert all(layer.target is None for layer in analysis.layers)
