"""Storage noise in the outputs: table columns and caption, τ lines and r_s marks, rank configs.

The layers are built by hand with a noise floor whose signal rank, share of
‖ΔW‖² below τ and flags are worked out below from the singular values.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace

import numpy as np
import pytest
from rich.console import Console

from svdrank.files import dumps
from svdrank.outputs.configs import read_allocation
from svdrank.outputs.formats import plans_csv, plans_markdown, ranks_record
from svdrank.outputs.plots import energy_curves, singular_value_decay, write_figures
from svdrank.outputs.tables import diff_tables, plans_table
from svdrank.spectra.signal import clean_spectrum
from svdrank.types import (
    Analysis,
    AnalysisSettings,
    Constraints,
    LayerNoise,
    LayerRank,
    LayerResult,
    PlanSet,
    RankPlan,
    RankRule,
    Spectrum,
)

SHAPE = (3, 5)
# module: σ, ‖ΔW‖², complete, τ, r_s = #{σ > τ}, exact, share of entries unchanged
LAYERS = {
    "layers.0.proj": ([3.0, 2.0, 0.5], 13.25, True, 1.23456, 2, True, 0.1),
    "layers.1.proj": ([2.0, 1.5, 1.2], 7.69, True, 1.6, 1, True, 0.6),
    "layers.2.proj": ([0.5, 0.4, 0.3], 0.5, True, 0.987654, 0, True, 0.2),
    "layers.3.proj": ([1.0, 0.5, 0.25], 1.3125, True, None, None, None, None),
    "layers.4.proj": ([4.0, 3.0], 26.0, False, 0.000123456, 2, False, 0.0),
}
# r_s ('+': a lower bound), τ to 3 digits, 1 − Σ_{i≤r_s} σᵢ² / ‖ΔW‖², flags:
# 0.25/13.25 = 1.9 %; 3.69/7.69 = 48.0 % > 10 % (noisy) and 60 % unchanged (sub-ulp);
# no σ above τ with ΔW ≠ 0 (noisy, unresolved); F32 has no floor; 1/26 = 3.8 %.
EXPECTED_CELLS = {
    "layers.0.proj": ["2", "1.23", "1.9%", ""],
    "layers.1.proj": ["1", "1.6", "48.0%", "noisy, sub-ulp"],
    "layers.2.proj": ["0", "0.988", "100.0%", "noisy, unresolved"],
    "layers.3.proj": ["-", "-", "-", ""],
    "layers.4.proj": ["2+", "0.000123", "3.8%", ""],
}
CAPTION = "2 layers noisy, 1 sub-ulp, 1 unresolved: see README 'Storage noise'"
NOISE_COLUMNS = ["r_s", "τ", "noise", "flags"]


def _noise(threshold: float, rank: int, exact: bool, unchanged: float) -> LayerNoise:
    """A BF16 noise floor with threshold τ and signal rank r_s as given."""
    return LayerNoise(
        grid="BF16",
        base_grid="BF16",
        roundings=2,
        noise_energy=0.01,
        threshold=threshold,
        signal_rank=rank,
        signal_rank_exact=exact,
        unchanged=unchanged,
        estimate="bound",
        threshold_low=threshold / 2,
    )


def _layer(module: str, spec: tuple) -> LayerResult:
    values, total, complete, threshold, rank, exact, unchanged = spec
    noise = None if threshold is None else _noise(threshold, rank, exact, unchanged)
    return LayerResult(
        module=module,
        name=f"{module}.weight",
        kind="proj",
        block=int(module.split(".")[1]),
        role="linear",
        shape=SHAPE,
        dtype="F32" if noise is None else "BF16",
        delta_norm=total**0.5,
        base_norm=10.0,
        spectrum=Spectrum(np.array(values), total, complete, "exact"),
        noise=noise,
    )


def _analysis(layers: dict[str, tuple]) -> Analysis:
    built = tuple(_layer(module, spec) for module, spec in layers.items())
    return Analysis({}, AnalysisSettings(), built, ())


@pytest.fixture
def noisy() -> Analysis:
    return _analysis(LAYERS)


@pytest.fixture
def clean() -> Analysis:
    """The same layers without any noise floor (F32 inputs)."""
    return _analysis(
        {module: (*spec[:3], None, None, None, None) for module, spec in LAYERS.items()}
    )


def _plan(analysis: Analysis, rule: RankRule, ranks: list[int], raw: list | None = None):
    """A plan as a noise-aware rule gives it: clean spectra where a layer has a floor."""
    raw = raw or [None] * len(ranks)
    items = []
    for layer, rank, raw_rank in zip(analysis.layers, ranks, raw, strict=True):
        view = replace(layer, spectrum=clean_spectrum(layer))
        squares = np.square(view.spectrum.values[:rank])
        energy = float(squares.sum() / view.spectrum.total_energy) if rank else 0.0
        items.append(LayerRank(view, rank, min(energy, 1.0), raw_rank))
    return RankPlan(rule, "fro", Constraints(), tuple(items))


BALANCED = RankRule("energy", 0.9, "balanced", preset="balanced")


def _plans(analysis: Analysis) -> PlanSet:
    chosen = _plan(analysis, BALANCED, [2, 1, 0, 2, 2], [3, 3, 3, 2, None])
    uniform = _plan(analysis, RankRule("uniform", 2, "r=2"), [2] * len(analysis.layers))
    return PlanSet((chosen,), chosen, (uniform,))


def _headers(table) -> list[str]:
    return [str(column.header) for column in table.columns]


def _noise_cells(table) -> dict[str, list[str]]:
    """module → its r_s, τ, noise and flags cells."""
    columns = {str(column.header): [str(cell) for cell in column.cells] for column in table.columns}
    return {
        module: [columns[name][row] for name in NOISE_COLUMNS]
        for row, module in enumerate(columns["module"])
        if module in LAYERS
    }


def _render(table, width: int) -> str:
    """The table as a pipe or a CI log shows it: no terminal, a fixed width."""
    stream = io.StringIO()
    Console(file=stream, width=width, force_terminal=False).print(table)
    return stream.getvalue()


def test_diff_table_shows_signal_rank_threshold_share_and_flags(noisy):
    table = diff_tables(noisy, _plans(noisy))[0]

    assert _headers(table)[-5:] == ["engine", *NOISE_COLUMNS]
    assert _noise_cells(table) == EXPECTED_CELLS
    assert table.caption == CAPTION


def test_recommend_table_reads_the_noise_from_the_raw_spectra(noisy):
    table = plans_table(list(_plans(noisy).chosen), noisy)

    assert _headers(table)[-4:] == NOISE_COLUMNS
    assert _noise_cells(table) == EXPECTED_CELLS
    assert table.caption == CAPTION


def test_tables_without_noise_are_unchanged(clean):
    plans = _plans(clean)

    layer_table = diff_tables(clean, plans)[0]
    ranks_table = plans_table(list(plans.chosen), clean)

    assert _headers(layer_table) == [
        "module",
        "shape",
        "‖ΔW‖",
        "‖ΔW‖/‖W‖",
        "r@90%",
        "E(r=2)",
        "engine",
    ]
    assert _headers(ranks_table) == ["module", "shape", "r balanced", "kept"]
    assert layer_table.caption is None and ranks_table.caption is None
    assert _headers(plans_table(list(plans.chosen))) == _headers(ranks_table)


def test_flag_caption_counts_one_layer_in_the_singular():
    analysis = _analysis({"layers.1.proj": LAYERS["layers.1.proj"]})
    only = _plan(analysis, BALANCED, [1])

    table = diff_tables(analysis, PlanSet((only,), only, ()))[0]

    assert table.caption == "1 layer noisy, 1 sub-ulp: see README 'Storage noise'"


def test_no_flag_no_caption():
    analysis = _analysis({"layers.0.proj": LAYERS["layers.0.proj"]})
    only = _plan(analysis, BALANCED, [2])

    table = diff_tables(analysis, PlanSet((only,), only, ()))[0]

    assert _headers(table)[-4:] == NOISE_COLUMNS
    assert table.caption is None


def test_noise_table_prints_plainly_without_a_terminal(noisy):
    text = _render(diff_tables(noisy, _plans(noisy))[0], width=160)  # the CLI's width in a pipe

    assert "\x1b[" not in text
    assert CAPTION in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│ layers." in line}
    for module, cells in EXPECTED_CELLS.items():
        shown = [cell.strip() for cell in rows[module].split("│")[-5:-1]]
        assert shown == cells


def _segments(ax, gid: str) -> list[np.ndarray]:
    return [points for c in ax.collections if c.get_gid() == gid for points in c.get_segments()]


def _panel(figure):
    return next(ax for ax in figure.axes if ax.get_title() == "proj")


def test_decay_plot_draws_each_layers_threshold_in_its_colour(noisy):
    figure = singular_value_decay(noisy)

    ax = _panel(figure)
    lines = _segments(ax, "noise-threshold")
    floors = [layer for layer in noisy.layers if layer.noise is not None]
    assert [line[0, 1] for line in lines] == pytest.approx(
        [layer.noise.threshold / layer.spectrum.values[0] for layer in floors]
    )
    assert [tuple(line[:, 0]) for line in lines] == [
        (1.0, float(layer.spectrum.values.size)) for layer in floors
    ]
    (collection,) = [c for c in ax.collections if c.get_gid() == "noise-threshold"]
    (curves,) = [c for c in ax.collections if c.get_gid() == "layer-curves"]
    modules = [layer.module for layer in noisy.layers]
    rgb = dict(zip(modules, curves.get_colors()[:, :3], strict=True))
    np.testing.assert_allclose(
        collection.get_colors()[:, :3], [rgb[layer.module] for layer in floors]
    )
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["noise threshold τ"]


def test_energy_curves_mark_the_signal_rank(noisy):
    figure = energy_curves(noisy, _plans(noisy).marked)

    ax = _panel(figure)
    marks = np.concatenate(
        [c.get_offsets() for c in ax.collections if c.get_gid() == "signal-rank"]
    )
    # The curves are the clean update's: (r_s, Σ_{i≤r_s} (σᵢ² − N̂/q) / (‖ΔW‖² − N̂)) with
    # q = 3 and N̂ = min(Σv = 0.01, ‖ΔW‖² − Σ_{i≤r_s} σᵢ²) = 0.01 for the layers with r_s > 0.
    expected = [
        [2, (13 - 2 * 0.01 / 3) / (13.25 - 0.01)],
        [1, (4 - 0.01 / 3) / (7.69 - 0.01)],
        [2, (25 - 2 * 0.01 / 3) / (26 - 0.01)],
    ]
    np.testing.assert_allclose(marks, expected)
    assert "signal rank r_s" in [text.get_text() for text in figure.legends[0].get_texts()]


def test_figures_without_noise_have_no_noise_marks(clean):
    decay = singular_value_decay(clean)
    curves = energy_curves(clean, _plans(clean).marked)

    for figure, gid in ((decay, "noise-threshold"), (curves, "signal-rank")):
        assert not [c for ax in figure.axes for c in ax.collections if c.get_gid() == gid]
    assert not decay.legends
    labels = [text.get_text() for text in curves.legends[0].get_texts()]
    assert labels == ["85% energy", "90% energy", "95% energy", "chosen rank"]


def test_noise_figures_save_as_png(noisy, tmp_path):
    figures = {
        "singular-values": singular_value_decay(noisy),
        "energy-curves": energy_curves(noisy, _plans(noisy).marked),
    }

    paths = write_figures(figures, tmp_path / "figures")

    assert [path.read_bytes()[:8] for path in paths] == [b"\x89PNG\r\n\x1a\n"] * 2


def test_rank_config_records_raw_and_signal_ranks_and_reads_back(noisy, tmp_path):
    chosen = _plans(noisy).chosen[0]

    record = json.loads(dumps(ranks_record(chosen, "a.json")))
    path = tmp_path / "ranks.json"
    path.write_text(dumps(record))
    allocation = read_allocation(path)

    assert record["noise_aware"] is True
    modules = record["modules"]
    assert [item["raw_rank"] for item in modules.values()] == [3, 3, 3, 2, None]
    assert [item["signal_rank"] for item in modules.values()] == [2, 1, 0, None, 2]
    assert {item.module: item.rank for item in allocation.modules} == {
        "layers.0.proj": 2,
        "layers.1.proj": 1,
        "layers.3.proj": 2,
        "layers.4.proj": 2,
    }


def test_rank_config_without_noise_is_not_noise_aware(clean):
    record = ranks_record(_plans(clean).chosen[0])

    assert record["noise_aware"] is False
    assert {item["signal_rank"] for item in record["modules"].values()} == {None}


def test_rank_config_without_the_noise_fields_still_reads(noisy, tmp_path):
    record = ranks_record(_plans(noisy).chosen[0])
    del record["noise_aware"]
    for item in record["modules"].values():
        del item["raw_rank"], item["signal_rank"]
    path = tmp_path / "older.json"
    path.write_text(dumps(record))

    assert [item.rank for item in read_allocation(path).modules] == [2, 1, 2, 2]


def test_csv_and_markdown_append_signal_and_raw_ranks_when_noise_aware(noisy):
    plans = [_plans(noisy).chosen[0]]

    rows = list(csv.reader(io.StringIO(plans_csv(plans))))
    lines = plans_markdown(plans).splitlines()

    assert rows[0] == [
        "module",
        "kind",
        "block",
        "shape",
        "rank_balanced",
        "energy_balanced",
        "signal_rank",
        "raw_rank_balanced",
    ]
    assert [[row[4], *row[6:]] for row in rows[1:]] == [
        ["2", "2", "3"],
        ["1", "1", "3"],
        ["0", "0", "3"],
        ["2", "", "2"],
        ["2", "2", ""],
    ]
    assert lines[0].count("|") == lines[-1].count("|") == len(rows[0]) + 1
    assert "raw rank balanced" in lines[0] and "signal rank" in lines[0]


def test_csv_without_noise_is_unchanged(clean):
    header = next(csv.reader(io.StringIO(plans_csv([_plans(clean).chosen[0]]))))

    assert header == ["module", "kind", "block", "shape", "rank_balanced", "energy_balanced"]


def test_signal_rule_config_has_no_rule_value():
    signal = RankRule("signal", 0.0, "signal", preset="signal")
    floors = _analysis({module: spec for module, spec in LAYERS.items() if spec[3] is not None})

    record = ranks_record(_plan(floors, signal, [2, 1, 0, 2]))

    assert (record["rule"], record["preset"]) == ("signal", "signal")
    fields = ("energy_target", "sv_ratio", "threshold", "uniform_rank", "budget")
    assert [record[field] for field in fields] == [None] * 5
    assert [item["rank"] for item in record["modules"].values()] == [2, 1, 0, 2]


def test_recommend_table_of_some_modules_counts_only_their_flags(noisy):
    selected = _analysis({"layers.1.proj": LAYERS["layers.1.proj"]})  # recommend --include

    table = plans_table([_plan(selected, BALANCED, [1])], noisy)

    assert _noise_cells(table) == {"layers.1.proj": EXPECTED_CELLS["layers.1.proj"]}
    assert table.caption == "1 layer noisy, 1 sub-ulp: see README 'Storage noise'"
