"""`svdrank diff` and `svdrank recommend` driven through the real command line."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from svdrank.analysis.file import ANALYSIS_SCHEMA
from svdrank.cli import app
from svdrank.spectra.energy import rank_at
from svdrank.types import Spectrum
from tests.conftest import SAMPLES, assert_one_line_error, write_checkpoint

BASE = SAMPLES / "base.safetensors"
TUNED = SAMPLES / "tuned.safetensors"
PRESET_TARGETS = {"conservative": 0.95, "balanced": 0.90, "aggressive": 0.85}


def _reference_ranks(target: float) -> dict[str, int]:
    """Ranks from NumPy's float64 SVD of ΔW, decoded by safetensors + torch (not svdrank)."""
    base, tuned = load_file(BASE), load_file(TUNED)
    ranks = {}
    for name, weight in base.items():
        other = tuned[name]
        if weight.ndim != 2 or not weight.is_floating_point() or weight.shape != other.shape:
            continue
        delta = (other.to(torch.float64) - weight.to(torch.float64)).numpy()
        sigma = np.linalg.svd(delta, compute_uv=False)
        module = name.removesuffix(".weight")
        if not sigma.any():
            ranks[module] = 0
            continue
        curve = np.cumsum(sigma**2) / np.sum(sigma**2)
        ranks[module] = int(np.argmax(curve >= target)) + 1
    return ranks


@pytest.fixture(scope="module")
def shared_analysis(tmp_path_factory):
    """Run `svdrank diff` on the sample pair once, in a temporary working directory."""
    directory = tmp_path_factory.mktemp("analysis")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        result = CliRunner().invoke(
            app, ["diff", str(BASE), str(SAMPLES / "tuned-sharded"), "--format", "json"]
        )
    assert result.exit_code == 0, result.stderr
    return directory / "svdrank-analysis.json"


@pytest.fixture
def analysis_file(shared_analysis, monkeypatch):
    """The shared analysis, in the working directory (its default path) during the test."""
    monkeypatch.chdir(shared_analysis.parent)
    return shared_analysis


def test_diff_writes_a_versioned_analysis_file(analysis_file):
    record = json.loads(analysis_file.read_text())

    assert record["schema"] == ANALYSIS_SCHEMA
    assert len(record["layers"]) == 29
    assert {item["reason"] for item in record["skipped"]} == {
        "shape-mismatch",
        "not-2d",
        "not-floating",
    }
    assert record["inputs"]["tuned"]["files"][0]["header_sha256"]
    layer = next(item for item in record["layers"] if item["module"].endswith("3.mlp.up_proj"))
    assert layer["shape"] == [352, 128] and layer["dtype"] == "BF16"
    assert layer["complete"] is True
    tuned = load_file(TUNED)["model.layers.3.mlp.up_proj.weight"].to(torch.float64)
    base = load_file(BASE)["model.layers.3.mlp.up_proj.weight"].to(torch.float64)
    assert layer["delta_norm"] == pytest.approx(float(torch.linalg.norm(tuned - base)), rel=1e-6)
    assert layer["base_norm"] == pytest.approx(float(torch.linalg.norm(base)), rel=1e-6)


def test_diff_stdout_json_is_the_analysis_record(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)

    result = run_cli("diff", BASE, TUNED, "-o", "a.json", "--format", "json")

    assert json.loads(result.stdout) == json.loads((tmp_path / "a.json").read_text())


def test_diff_table_shows_layers_summary_and_skips(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)

    result = run_cli("diff", BASE, TUNED, "--format", "table")

    assert result.exit_code == 0
    for text in (
        "model.layers.3.mlp.gate_proj",
        "r@95%",
        "E(r=16)",
        "LoRA parameters per kind",
        "shapes differ",
        "lm_head.weight",
    ):
        assert text in result.stdout
    assert "wrote svdrank-analysis.json (29 layers, 11 skipped)" in result.stderr


@pytest.mark.parametrize("preset", sorted(PRESET_TARGETS))
def test_preset_ranks_equal_numpy_exact_svd(analysis_file, run_cli, preset):
    result = run_cli("recommend", analysis_file, "--preset", preset, "--format", "json")

    modules = json.loads(result.stdout)["modules"]
    assert {name: item["rank"] for name, item in modules.items()} == _reference_ranks(
        PRESET_TARGETS[preset]
    )


def test_custom_energy_ranks_equal_numpy_exact_svd(analysis_file, run_cli):
    result = run_cli("recommend", analysis_file, "--energy", "0.7")

    record = json.loads(result.stdout)  # not a terminal: JSON without asking
    assert record["energy_target"] == 0.7
    assert {name: item["rank"] for name, item in record["modules"].items()} == _reference_ranks(0.7)


def test_native_json_totals_add_up(analysis_file, run_cli):
    record = json.loads(run_cli("recommend", analysis_file, "--energy", "0.9").stdout)

    modules = record["modules"]
    for item in modules.values():
        m, n = item["shape"]
        assert item["params"] == item["rank"] * (m + n)
    assert record["totals"]["params"] == sum(item["params"] for item in modules.values())
    assert record["totals"]["full_params"] == sum(
        item["shape"][0] * item["shape"][1] for item in modules.values()
    )


def test_default_analysis_path_and_balanced_default_for_json(analysis_file, run_cli):
    result = run_cli("recommend")

    record = json.loads(result.stdout)
    rule = (record["rule"], record["preset"], record["energy_target"])
    assert rule == ("energy", "balanced", 0.9)
    assert "writing the balanced plan" in result.stderr


def test_clamps_min_max_and_multiple_of(analysis_file, run_cli):
    result = run_cli(
        "recommend", "--energy", "0.9", "--min-rank", "4", "--max-rank", "32", "--multiple-of", "8"
    )

    ranks = {name: item["rank"] for name, item in json.loads(result.stdout)["modules"].items()}
    reference = _reference_ranks(0.9)
    for module, rank in ranks.items():
        expected = 0 if reference[module] == 0 else min(32, -(-max(reference[module], 4) // 8) * 8)
        assert rank == expected


def test_sv_ratio_and_threshold_modes_count_singular_values(analysis_file, run_cli):
    base, tuned = load_file(BASE), load_file(TUNED)
    name = "model.layers.0.self_attn.v_proj.weight"
    delta = (tuned[name].to(torch.float64) - base[name].to(torch.float64)).numpy()
    sigma = np.linalg.svd(delta, compute_uv=False)

    by_ratio = json.loads(run_cli("recommend", "--sv-ratio", "10").stdout)["modules"]
    by_threshold = json.loads(run_cli("recommend", "--threshold", "0.05").stdout)["modules"]

    module = name.removesuffix(".weight")
    assert by_ratio[module]["rank"] == int(np.sum(sigma >= sigma[0] / 10))
    assert by_threshold[module]["rank"] == int(np.sum(sigma >= 0.05))


def test_csv_and_markdown_put_the_presets_side_by_side(analysis_file, run_cli):
    rows = list(csv.DictReader(io.StringIO(run_cli("recommend", "--format", "csv").stdout)))
    markdown = run_cli("recommend", "--format", "markdown").stdout

    assert len(rows) == 29
    reference = _reference_ranks(0.95)
    assert {row["module"]: int(row["rank_conservative"]) for row in rows} == reference
    assert markdown.startswith("| module | kind | block | shape | rank conservative")
    assert "**total**" in markdown


def test_output_file_format_follows_its_suffix(analysis_file, run_cli, tmp_path):
    result = run_cli("recommend", "--preset", "aggressive", "-o", tmp_path / "ranks.csv")

    assert result.exit_code == 0
    assert (tmp_path / "ranks.csv").read_text().startswith("module,kind,block,shape")
    assert result.stdout == ""


def test_peft_output_needs_no_key_that_matches_another_module(analysis_file, run_cli):
    record = json.loads(run_cli("recommend", "--preset", "balanced", "--format", "peft").stdout)

    import re

    modules = list(_reference_ranks(0.9))
    for key in record["rank_pattern"]:
        matches = [name for name in modules if re.match(rf"(.*\.)?({key})$", name)]
        assert matches == [key]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--energy", "1.5"), "(0, 1]"),
        (("--energy", "0"), "(0, 1]"),
        (("--energy", "0.9", "--preset", "balanced"), "only one of --energy, --preset"),
        (("--sv-ratio", "0.5"), "--sv-ratio must be a finite number ≥ 1"),
        (("--max-rank", "2", "--min-rank", "4"), "--max-rank must be ≥ 1 and ≥ --min-rank 4"),
    ],
)
def test_bad_recommend_options_are_one_line_errors(analysis_file, run_cli, args, words):
    assert_one_line_error(run_cli("recommend", *args), words)


def test_unknown_preset_is_a_usage_error_exit_2(analysis_file, run_cli):
    assert_one_line_error(run_cli("recommend", "--preset", "greedy"), "--preset", "greedy")


def test_missing_analysis_file_is_one_line_error(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)

    assert_one_line_error(run_cli("recommend"), "svdrank-analysis.json", "svdrank diff")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{ not json", "not a readable analysis file"),
        (json.dumps({"schema": "svdrank.analysis/0"}), "schema 'svdrank.analysis/0'"),
        (json.dumps({"schema": ANALYSIS_SCHEMA, "layers": []}), "corrupt analysis file"),
    ],
)
def test_corrupt_or_foreign_analysis_file_is_one_line_error(tmp_path, run_cli, content, words):
    path = tmp_path / "a.json"
    path.write_text(content)

    assert_one_line_error(run_cli("recommend", path), str(path), words)


def test_unwritable_output_fails_before_the_work_and_writes_nothing(tmp_path, run_cli):
    missing = tmp_path / "no" / "such" / "a.json"

    assert_one_line_error(run_cli("diff", BASE, TUNED, "-o", missing), "does not exist")
    assert_one_line_error(run_cli("diff", BASE, TUNED, "-o", tmp_path), "is a directory")
    assert not missing.parent.exists()


def test_failed_diff_keeps_the_previous_analysis_file(analysis_file, run_cli, tmp_path):
    before = analysis_file.read_bytes()
    bad = write_checkpoint(
        tmp_path / "other.safetensors", {"x.weight": np.ones((3, 3), np.float32)}
    )

    assert_one_line_error(run_cli("diff", BASE, bad), "no layers in common")
    assert analysis_file.read_bytes() == before
    leftovers = analysis_file.parent.iterdir()
    assert [p.name for p in leftovers if p.name.startswith(".svdrank")] == []


def test_nan_in_an_update_is_one_line_error_naming_the_layer(tmp_path, run_cli):
    weight = np.ones((8, 8), np.float32)
    broken = weight.copy()
    broken[2, 2] = np.nan
    base = write_checkpoint(tmp_path / "b.safetensors", {"layers.0.q_proj.weight": weight})
    tuned = write_checkpoint(tmp_path / "t.safetensors", {"layers.0.q_proj.weight": broken})

    result = run_cli("diff", base, tuned, "-o", tmp_path / "a.json")

    assert_one_line_error(result, "layers.0.q_proj.weight", "NaN or Inf")
    assert not (tmp_path / "a.json").exists()


def test_include_and_exclude_select_modules(tmp_path, run_cli):
    out = tmp_path / "a.json"

    run_cli("diff", BASE, TUNED, "-o", out, "--include", "*.self_attn.*", "--exclude", "*.q_proj")

    kinds = {layer["kind"] for layer in json.loads(out.read_text())["layers"]}
    assert kinds == {"self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}


@pytest.mark.parametrize("engine", ["exact", "gram", "randomized", "lanczos"])
def test_every_engine_gives_the_reference_ranks_on_the_samples(tmp_path, run_cli, engine):
    out = tmp_path / "a.json"
    run_cli("diff", BASE, TUNED, "-o", out, "--engine", engine)

    result = run_cli("recommend", out, "--preset", "balanced", "--format", "json")

    ranks = {name: item["rank"] for name, item in json.loads(result.stdout)["modules"].items()}
    assert ranks == _reference_ranks(0.9)


def test_nuclear_metric_uses_sum_of_singular_values(tmp_path, run_cli):
    out = tmp_path / "a.json"
    run_cli("diff", BASE, TUNED, "-o", out, "--metric", "nuclear")
    base, tuned = load_file(BASE), load_file(TUNED)
    name = "model.layers.1.mlp.gate_proj.weight"
    delta = (tuned[name].to(torch.float64) - base[name].to(torch.float64)).numpy()
    sigma = np.linalg.svd(delta, compute_uv=False)
    expected = int(np.argmax(np.cumsum(sigma) / sigma.sum() >= 0.9)) + 1

    record = json.loads(run_cli("recommend", out, "--energy", "0.9").stdout)

    assert record["metric"] == "nuclear"
    assert record["modules"][name.removesuffix(".weight")]["rank"] == expected


def test_ctrl_c_exits_130_with_one_line_and_keeps_only_the_results_log(
    tmp_path, run_cli, monkeypatch
):
    from svdrank.analysis import pipeline

    real_analyze = pipeline.analyze

    def interrupted(*args, **kwargs):
        def progress(update):
            if update.layers_done == 3:
                raise KeyboardInterrupt

        return real_analyze(*args, **{**kwargs, "progress": progress})

    monkeypatch.setattr(pipeline, "analyze", interrupted)
    out = tmp_path / "a.json"

    result = run_cli("diff", BASE, TUNED, "-o", out)

    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == [
        f"svdrank: interrupted; the finished layers are kept in {out}.resume: "
        "the same command with --resume computes the rest"
    ]
    assert list(tmp_path.iterdir()) == [tmp_path / "a.json.resume"]
    assert len((tmp_path / "a.json.resume").read_text().splitlines()) == 1 + 3


def test_without_a_terminal_stderr_has_no_progress_bar(tmp_path, run_cli):
    result = run_cli("diff", BASE, TUNED, "-o", tmp_path / "a.json", "--format", "json")

    assert result.stderr.splitlines() == [
        "wrote " + str(tmp_path / "a.json") + " (29 layers, 11 skipped)"
    ]


def test_quiet_prints_nothing_on_stderr(tmp_path, run_cli):
    result = run_cli("diff", BASE, TUNED, "-o", tmp_path / "a.json", "--quiet", "--format", "json")

    assert result.exit_code == 0 and result.stderr == ""


def _analyses_by_workers(tmp_path, run_cli, base, tuned, workers, *options) -> list[dict]:
    """Write the pair, run `diff` once per --workers value, return each analysis record."""
    pair = (
        write_checkpoint(tmp_path / "b.safetensors", base),
        write_checkpoint(tmp_path / "t.safetensors", tuned),
    )
    records = []
    for count in workers:
        out = tmp_path / f"a{count}.json"
        run_cli("diff", *pair, "-o", out, "--workers", count, *options)
        records.append(json.loads(out.read_text()))
    return records


def test_workers_give_the_same_analysis_as_one(tmp_path, run_cli):
    # Layers wide enough that the randomized sketch really runs (and is seeded per layer).
    from tests.spectra import planted

    sigma = np.arange(1, 401, dtype=np.float64) ** -1.0
    base = {f"layers.{i}.proj.weight": np.zeros((600, 400), np.float32) for i in range(5)}
    tuned = {name: planted((600, 400), sigma, np.float32, seed=i) for i, name in enumerate(base)}

    records = _analyses_by_workers(
        tmp_path, run_cli, base, tuned, ("1", "3"), "--engine", "randomized"
    )

    assert {layer["engine"] for layer in records[0]["layers"]} == {"randomized"}
    for one, many in zip(records[0]["layers"], records[1]["layers"], strict=True):
        assert one["module"] == many["module"]
        assert one["singular_values"] == many["singular_values"]


def test_auto_probes_alike_layers_through_the_gram_matrix_any_workers(tmp_path, run_cli):
    """A kind that needed its whole spectrum is probed on G next time; same numbers."""
    from tests.spectra import planted, reference_ranks

    slow = np.arange(1, 401, dtype=np.float64) ** -0.5
    fast = np.arange(1, 401, dtype=np.float64) ** -1.5
    tuned = {}
    for block in range(3):
        tuned[f"layers.{block}.a_proj.weight"] = planted((600, 400), slow, np.float32, block)
        tuned[f"layers.{block}.b_proj.weight"] = planted((600, 400), fast, np.float32, block)
        changing = slow if block == 0 else fast
        tuned[f"layers.{block}.c_proj.weight"] = planted((600, 400), changing, np.float32, block)
    base = {name: np.zeros_like(value) for name, value in tuned.items()}

    records = _analyses_by_workers(tmp_path, run_cli, base, tuned, ("1", "2"))

    routes = {
        layer["module"]: (layer["engine"], layer["complete"]) for layer in records[0]["layers"]
    }
    assert {routes[f"layers.{b}.a_proj"] for b in range(3)} == {("gram", True)}
    assert {routes[f"layers.{b}.b_proj"] for b in range(3)} == {("randomized", False)}
    # c_proj decays slowly in block 0 only: block 0 is the kind's probe, so blocks 1 and 2
    # are both probed on G (and truncated there).
    assert [routes[f"layers.{b}.c_proj"] for b in range(3)] == [
        ("gram", True),
        ("gram", False),
        ("gram", False),
    ]
    for one, two in zip(records[0]["layers"], records[1]["layers"], strict=True):
        assert one["singular_values"] == two["singular_values"]
        matrix = tuned[one["name"]]
        spectrum = Spectrum(
            np.array(one["singular_values"]), one["total_energy"], one["complete"], one["engine"]
        )
        ranks = [rank_at(spectrum, target) for target in (0.85, 0.90, 0.95)]
        for rank, reference in zip(ranks, reference_ranks(matrix), strict=True):
            assert reference <= rank <= reference + 4  # truncated: never below, ≤ 1 % above
