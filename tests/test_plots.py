"""Figures checked through their matplotlib objects, and the files they are saved to."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from svdrank.analysis.pipeline import analyze
from svdrank.outputs.plots import (
    budget_bars,
    energy_curves,
    make_figures,
    rank_heatmap,
    singular_value_decay,
    write_figures,
)
from svdrank.ranks.rules import plan, plan_set, preset_rule
from tests.conftest import SAMPLES
from tests.spectra import synthetic_analysis

LLAMA_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def sample():
    return analyze(SAMPLES / "base.safetensors", SAMPLES / "tuned.safetensors")


def _lines(ax, gid=None):
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def _curves(ax) -> list[np.ndarray]:
    """The (x, y) points of every layer's curve in a panel."""
    collections = [c for c in ax.collections if c.get_gid() == "layer-curves"]
    return [points for c in collections for points in c.get_segments()]


def _marks(ax) -> np.ndarray:
    """The (k, E(k)) points of a panel's chosen-rank marks."""
    marks = [c.get_offsets() for c in ax.collections if c.get_gid() == "chosen-rank"]
    return np.concatenate(marks) if marks else np.empty((0, 2))


def test_energy_curves_one_curve_per_layer_and_marks_the_chosen_ranks(sample):
    balanced = plan(sample, preset_rule("balanced"))

    figure = energy_curves(sample, balanced)

    axes = {ax.get_title(): ax for ax in figure.axes if ax.get_title()}
    nonzero = [item for item in balanced.layers if item.layer.spectrum.total_energy > 0]
    for kind, ax in axes.items():
        expected = [item for item in nonzero if item.layer.kind.rsplit(".", 1)[-1] == kind]
        curves = _curves(ax)
        assert len(curves) == len(expected)
        marks = _marks(ax)
        assert marks[:, 0].tolist() == [item.rank for item in expected]
        for (k, energy), item in zip(marks, expected, strict=True):
            # The sample is BF16: the curves are the clean update's (the plan's spectra),
            # E(k) = Σ_{i≤k} (σᵢ² − N̂/q) / (‖ΔW‖² − N̂) with N̂ = min(Σv, residual above r_s).
            stored = next(layer for layer in sample.layers if layer.module == item.layer.module)
            squares = stored.spectrum.values**2
            noise = stored.noise
            residual = stored.spectrum.total_energy - squares[: noise.signal_rank].sum()
            removed = min(noise.noise_energy, residual)
            size = min(stored.shape)
            clean = squares[: int(k)].sum() - int(k) * removed / size
            assert energy == pytest.approx(clean / (stored.spectrum.total_energy - removed))
        targets = sorted(line.get_ydata()[0] for line in _lines(ax, "target-line"))
        assert targets == [0.85, 0.90, 0.95]


def test_heatmap_cells_equal_the_recommended_ranks(sample, run_cli, tmp_path):
    analysis_file = tmp_path / "a.json"
    run_cli(
        "diff", SAMPLES / "base.safetensors", SAMPLES / "tuned.safetensors", "-o", analysis_file
    )
    recommended = json.loads(run_cli("recommend", analysis_file, "--preset", "aggressive").stdout)

    figure = rank_heatmap(plan(sample, preset_rule("aggressive")))

    image = np.asarray(figure.axes[0].images[0].get_array())
    kinds = [label.get_text() for label in figure.axes[0].get_xticklabels()]
    expected = np.zeros((4, 7))
    for module, item in recommended["modules"].items():
        if ".layers." in module:
            expected[int(module.split(".")[2]), kinds.index(module.rsplit(".", 1)[1])] = item[
                "rank"
            ]
    np.testing.assert_array_equal(image, expected)
    labels = [text for text in figure.axes[0].texts if text.get_gid() == "rank-label"]
    assert len(labels) == 4 * 7


def test_singular_value_decay_has_a_curve_per_nonzero_layer(sample):
    figure = singular_value_decay(sample)

    curves = sum(len(_curves(ax)) for ax in figure.axes if ax.get_title())
    assert curves == sum(1 for layer in sample.layers if layer.spectrum.total_energy > 0)
    q_proj = next(ax for ax in figure.axes if ax.get_title() == "q_proj")
    first = next(layer for layer in sample.layers if layer.kind == "self_attn.q_proj")
    np.testing.assert_allclose(
        _curves(q_proj)[0][:, 1], first.spectrum.values / first.spectrum.values[0]
    )


def test_budget_bars_show_each_plan_and_the_uniform_ranks(sample):
    plans = plan_set(sample)

    figure = budget_bars(plans)

    heights = [bar.get_height() for bar in figure.axes[0].patches]
    uniform = [
        sum(min(r, min(layer.shape)) * sum(layer.shape) for layer in sample.layers)
        for r in (8, 16, 64)
    ]
    assert heights == [p.params for p in plans.chosen] + uniform


def _llama_analysis(blocks: int):
    rng = np.random.default_rng(blocks)
    modules, shapes, spectra = [], [], []
    for block in range(blocks):
        for kind in LLAMA_KINDS:
            modules.append(f"model.layers.{block}.{kind}")
            shapes.append((96, 64))
            spectra.append(np.arange(1, 65) ** -rng.uniform(0.3, 2.0))
    return synthetic_analysis(spectra, shapes, modules)


def test_heatmap_of_80_blocks_thins_labels_and_keeps_every_value():
    analysis = _llama_analysis(80)
    balanced = plan(analysis, preset_rule("balanced"))

    figure = rank_heatmap(balanced)

    ax = figure.axes[0]
    assert np.asarray(ax.images[0].get_array()).shape == (80, 7)
    assert len(ax.get_yticklabels()) <= 40
    assert len(figure.axes) == 2  # the map and its colour bar


def test_files_are_valid_png_svg_and_pdf_with_deterministic_names(sample, tmp_path):
    figures = make_figures(sample, plan_set(sample))
    names = {
        "energy-curves",
        "singular-values",
        "budget",
        "rank-heatmap-conservative",
        "rank-heatmap-balanced",
        "rank-heatmap-aggressive",
    }
    assert set(figures) == names
    for image_format in ("png", "svg", "pdf"):
        paths = write_figures(figures, tmp_path / image_format, image_format)

        assert {path.name for path in paths} == {f"{name}.{image_format}" for name in names}
        for path in paths:
            data = path.read_bytes()
            if image_format == "png":
                assert data.startswith(b"\x89PNG\r\n\x1a\n")
            elif image_format == "pdf":
                assert data.startswith(b"%PDF-")
            else:
                assert ET.fromstring(data).tag.endswith("svg")


def test_plot_command_prints_the_paths_and_writes_a_self_contained_report(tmp_path, run_cli):
    analysis_file = tmp_path / "a.json"
    run_cli(
        "diff", SAMPLES / "base.safetensors", SAMPLES / "tuned.safetensors", "-o", analysis_file
    )

    result = run_cli("plot", analysis_file, "-o", tmp_path / "plots", "--energy", "0.8", "--html")

    assert result.exit_code == 0, result.stderr
    printed = result.stdout.split()
    assert [path.rsplit("/", 1)[-1] for path in printed] == [
        "energy-curves.png",
        "singular-values.png",
        "rank-heatmap-energy-0.8.png",
        "budget.png",
        "report.html",
    ]
    report = (tmp_path / "plots" / "report.html").read_text()
    assert report.count('src="data:image/png;base64,') == 4
    assert "http" not in report


def test_plot_include_selects_modules(tmp_path, run_cli):
    analysis_file = tmp_path / "a.json"
    run_cli(
        "diff", SAMPLES / "base.safetensors", SAMPLES / "tuned.safetensors", "-o", analysis_file
    )

    result = run_cli("plot", analysis_file, "-o", tmp_path / "p", "--include", "*.mlp.*")
    missing = run_cli("plot", analysis_file, "-o", tmp_path / "q", "--include", "*.nothing")

    assert result.exit_code == 0
    assert missing.exit_code == 2 and "no analysed module matches" in missing.stderr


def test_diff_plot_writes_figures_in_the_same_run(tmp_path, run_cli):
    result = run_cli(
        "diff",
        SAMPLES / "base.safetensors",
        SAMPLES / "tuned.safetensors",
        "-o",
        tmp_path / "a.json",
        "--plot",
        tmp_path / "figures",
    )

    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "figures" / "energy-curves.png").is_file()
    assert "6 figures in" in result.stderr
