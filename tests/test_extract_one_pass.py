"""Extraction reads the pair once for per-layer rules, with the two-pass output and analysis.

The reference is the two-pass path (the whole analysis by ``analyze``, then
each ΔW formed again for its factors), which budgets still take.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import svdrank.analysis.delta as delta_module
import svdrank.analysis.extract as factor_module
import svdrank.analysis.extract_pass as one_pass_module
import svdrank.analysis.pipeline as pipeline
import svdrank.outputs.extract as extract_module
from svdrank import analyze, extract
from svdrank.analysis.delta import form_delta
from svdrank.analysis.extract import NEAR_OPTIMAL, FactorSettings
from svdrank.analysis.file import layer_record
from svdrank.analysis.pipeline import place_in_model
from svdrank.errors import UsageError
from svdrank.inputs.checkpoint import open_checkpoint
from svdrank.inputs.pairing import pair_checkpoints
from svdrank.types import AnalysisSettings, EngineSettings
from tests.conftest import write_checkpoint, write_decaying_pair

RULES = [
    {"preset": "balanced"},
    {"energy": 0.9, "max_rank": 40},
    {"sv_ratio": 8.0},
    {"rank": 5},
    {"preset": "conservative", "alpha_ratio": 0.3, "dtype": "fp16"},
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A BF16 pair: q and v layers decay too slowly for a sketch, k layers truncate."""
    return write_decaying_pair(tmp_path_factory.mktemp("pair"), blocks=3)


def _extract(pair: tuple[Path, Path], output: Path, **options: object) -> dict:
    """Extract quietly; return the config, the weights file's bytes and the layers' quality."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extraction = extract(*pair, output, **options)  # type: ignore[arg-type]
    config = json.loads((output / "adapter_config.json").read_text())
    weights = (output / "adapter_model.safetensors").read_bytes()
    return {"config": config, "weights": weights, "layers": extraction.layers}


@pytest.mark.parametrize("options", RULES, ids=lambda options: "-".join(map(str, options)))
def test_one_pass_writes_the_two_pass_adapter(pair, tmp_path, monkeypatch, options):
    # The one pass takes the vectors from the engine's own work (its Gram reduction or sketch),
    # the two passes compute them afresh: the same ranks and scales, errors equally near optimal.
    one = _extract(pair, tmp_path / "one", **options)
    monkeypatch.setattr(extract_module, "per_layer_rule", lambda *args: False)
    two = _extract(pair, tmp_path / "two", **options)
    assert one["config"] == two["config"]
    assert len(one["weights"]) == len(two["weights"])
    assert [layer.module for layer in one["layers"]] == [layer.module for layer in two["layers"]]
    for first, second in zip(one["layers"], two["layers"], strict=True):
        assert (first.rank, first.alpha, first.energy > 0) == (second.rank, second.alpha, True)
        assert first.optimal == pytest.approx(second.optimal, rel=1e-3)
        assert first.error <= NEAR_OPTIMAL * first.optimal + 1e-3
        assert first.error == pytest.approx(second.error, rel=0.01)


def test_one_pass_forms_each_update_once(pair, tmp_path, monkeypatch):
    formed: list[str] = []
    real = delta_module.form_delta

    def counting(layer, *args):
        formed.append(layer.name)
        return real(layer, *args)

    for module in (one_pass_module, factor_module, pipeline):
        monkeypatch.setattr(module, "form_delta", counting)
    _extract(pair, tmp_path / "one", preset="balanced")
    assert len(formed) == 9
    assert sorted(formed) == sorted(set(formed))


def test_budget_reads_the_pair_twice(pair, tmp_path, monkeypatch):
    formed: list[str] = []
    real = delta_module.form_delta
    monkeypatch.setattr(
        pipeline, "form_delta", lambda layer, *args: formed.append(layer.name) or real(layer, *args)
    )
    _extract(pair, tmp_path / "budget", budget_ratio=0.2)
    assert len(formed) == 9


def test_one_pass_analysis_is_the_analysis_of_analyze(pair):
    reference = analyze(*pair, max_energy=0.95, seed=3)
    settings = AnalysisSettings(engine=EngineSettings(max_energy=0.95), seed=3)
    base, tuned = open_checkpoint(pair[0]), open_checkpoint(pair[1])
    _, layers = place_in_model(pair_checkpoints(base, tuned).layers, tuned, base)
    passes = one_pass_module.analyze_and_factor(
        layers, settings, lambda result: 2, lambda rank: 2.0, FactorSettings(seed=3)
    )
    found = [result for result, _, _ in passes]
    assert settings == reference.settings

    def records(results):
        return [
            {key: value for key, value in layer_record(result).items() if key != "seconds"}
            for result in results
        ]

    assert records(found) == records(reference.layers)


def _light_fine_tune(directory: Path, rank: int = 4) -> tuple[Path, Path]:
    """A BF16 pair whose update is rank ``rank`` at 0.1 % of ‖W‖: the storage noise dominates."""
    rng = np.random.default_rng(3)
    weight = (0.02 * rng.standard_normal((192, 160))).astype(ml_dtypes.bfloat16)
    wide = weight.astype(np.float32)
    update = rng.standard_normal((192, rank)) @ rng.standard_normal((rank, 160))
    update *= 1e-3 * np.linalg.norm(wide) / np.linalg.norm(update)
    tuned = (wide + update.astype(np.float32)).astype(ml_dtypes.bfloat16)
    base_file = write_checkpoint(directory / "base.safetensors", {"proj.weight": weight})
    tuned_file = write_checkpoint(directory / "tuned.safetensors", {"proj.weight": tuned})
    return base_file, tuned_file


@pytest.mark.parametrize("analysed", [False, True], ids=["one-pass", "given-analysis"])
def test_noise_off_extracts_at_the_raw_ranks_and_auto_at_the_clean_ones(tmp_path, analysed):
    base, tuned = _light_fine_tune(tmp_path)
    stored = pair_checkpoints(open_checkpoint(base), open_checkpoint(tuned)).layers[0]
    delta = np.asarray(form_delta(stored).delta, dtype=np.float64)
    values = np.linalg.svd(delta, compute_uv=False)
    raw = int(np.searchsorted(np.cumsum(values**2) / np.sum(values**2), 0.90) + 1)
    assert raw > 40  # the rounding noise spreads the raw energy over many directions
    ranks = {}
    for noise in ("auto", "off"):
        options: dict = {"preset": "balanced", "noise": noise}
        if analysed:
            options["analysis"] = analyze(base, tuned, noise="full" if noise == "auto" else "off")
        (layer,) = _extract((base, tuned), tmp_path / noise, **options)["layers"]
        ranks[noise] = layer.rank
    assert ranks == {"auto": 4, "off": raw}


def test_extract_refuses_an_unknown_noise_mode(tmp_path):
    with pytest.raises(UsageError, match="noise"):
        extract(*_light_fine_tune(tmp_path), tmp_path / "adapter", noise="full")


def test_the_cli_extracts_at_raw_ranks_with_noise_off(tmp_path, run_cli):
    base, tuned = _light_fine_tune(tmp_path)
    ranks = {}
    for noise in ("auto", "off"):
        output = tmp_path / noise
        result = run_cli("extract", base, tuned, "-o", output, "--format", "json", "--noise", noise)
        assert result.exit_code == 0, result.output
        ranks[noise] = json.loads((output / "adapter_config.json").read_text())["r"]
    assert ranks["auto"] == 4 and ranks["off"] > 40
    refused = run_cli("extract", base, tuned, "-o", tmp_path / "x", "--noise", "full")
    assert refused.exit_code == 2
