"""Figures of an analysis: energy curves, singular-value decay, rank heat maps, budgets.

Built on ``matplotlib.figure.Figure`` without pyplot: no global state, no
display, any backend-free environment works. Each figure function returns the
Figure so that callers (and tests) can inspect it; :func:`write_figures` saves
them under deterministic names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

from svdrank.errors import UsageError
from svdrank.files import output_directory, write_files_atomically
from svdrank.inputs.names import kinds_in_order, short_kinds
from svdrank.outputs.formats import IMAGE_FORMATS
from svdrank.outputs.heatmaps import DPI, rank_heatmap
from svdrank.outputs.noise_marks import (
    draw_signal_marks,
    draw_thresholds,
    signal_handle,
    signal_point,
    threshold_handle,
    threshold_segment,
)
from svdrank.outputs.report import html_report, summary_table_html
from svdrank.ranks.rules import PRESETS
from svdrank.spectra.energy import energy_curve
from svdrank.types import Analysis, LayerResult, PlanSet, RankPlan

# Okabe & Ito's colour-blind-safe palette, for categorical series.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
BLOCK_COLORMAP = "viridis"
"""Heat maps annotate every cell up to this many blocks, then only the colour bar speaks."""
MAX_CURVE_POINTS = 400
"""Points drawn per curve at most; more than a panel has pixels for only costs time."""


Figures = dict[str, Figure]
"""The figures of one analysis, keyed by their file stem."""


def panel_labels(layers: Sequence[LayerResult]) -> dict[str, str]:
    """Label every layer's module with its panel: ``stack: kind`` by the kind's short suffix."""
    short = short_kinds(layer.kind for layer in layers)
    return {
        layer.module: f"{layer.stack}: {short[layer.kind]}" if layer.stack else short[layer.kind]
        for layer in layers
    }


def _panel_grid(count: int) -> tuple[int, int]:
    """Rows and columns for ``count`` panels, at most 4 wide."""
    columns = min(4, count)
    return math.ceil(count / columns), columns


def _panels(title: str, kinds: list[str], sharey: bool = True) -> tuple[Figure, dict]:
    """Make a figure with one axes per kind."""
    rows, columns = _panel_grid(len(kinds))
    figure = Figure(figsize=(4.2 * columns, 3.3 * rows), dpi=DPI, layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False, sharey=sharey)
    axes = {}
    for index, ax in enumerate(grid.flat):
        if index < len(kinds):
            axes[kinds[index]] = ax
            ax.set_title(kinds[index])
        else:
            ax.set_visible(False)
    figure.suptitle(title)
    return figure, axes


def _block_colors(layers: Sequence[LayerResult]):
    """Make a function giving each layer its colour by block (viridis); return it and the norm."""
    blocks = [layer.block for layer in layers if layer.block is not None]
    norm = Normalize(min(blocks, default=0), max(max(blocks, default=0), 1))
    cmap = colormaps[BLOCK_COLORMAP]

    def color(layer: LayerResult):
        return "#555555" if layer.block is None else cmap(norm(layer.block))

    return color, norm, cmap


def energy_curves(analysis: Analysis, rank_plan: RankPlan) -> Figure:
    """E(k) of every layer, one panel per kind, 85/90/95 % lines, each chosen rank marked.

    Each panel draws its curves as one ``LineCollection`` (gid ``layer-curves``)
    and its marks as one scatter (gid ``chosen-rank``), in the order of
    ``analysis.layers``: one artist per panel instead of one per layer keeps a
    32-block figure well under a second. A noise-aware plan's curves are those
    of each layer's clean update (the spectra its ranks were read from), so the
    target lines cross them at the marked ranks; they end at the signal rank
    r_s, which is marked too (one scatter per panel, gid ``signal-rank``).
    """
    metric = rank_plan.metric
    labels = panel_labels(analysis.layers)
    kinds = kinds_in_order(labels.values())
    shown = {item.layer.module: item.layer.spectrum for item in rank_plan.layers}
    clean = any(spectrum.noise_limited for spectrum in shown.values())
    figure, axes = _panels(
        f"Energy kept by rank k ({metric}{', clean update' if clean else ''}) — "
        f"marks: {rank_plan.rule.label}",
        kinds,
    )
    color, norm, cmap = _block_colors(analysis.layers)
    ranks = {item.layer.module: item.rank for item in rank_plan.layers}
    wide = _spans_a_decade(list(ranks.values()))
    curves, marks, signals = _by_kind(kinds), _by_kind(kinds), _by_kind(kinds)
    for layer in analysis.layers:
        curve = energy_curve(shown.get(layer.module, layer.spectrum), metric)
        if curve.size == 0:
            continue
        points = _thinned(curve.size, log=wide)
        panel = labels[layer.module]
        curves[panel].append((np.column_stack([points, curve[points - 1]]), color(layer)))
        rank = ranks[layer.module]
        if rank > 0:
            marks[panel].append(((rank, curve[min(rank, curve.size) - 1]), color(layer)))
        signal = signal_point(layer, curve)
        if signal is not None:
            signals[panel].append((signal, color(layer)))
    for kind, ax in axes.items():
        _draw_curves(ax, curves[kind])
        _draw_marks(ax, marks[kind])
        draw_signal_marks(ax, signals[kind])
        for target, style in zip(sorted(PRESETS.values()), (":", "--", "-."), strict=True):
            ax.axhline(
                target,
                color="#777777",
                linestyle=style,
                linewidth=0.8,
                label=f"{target:.0%} energy",
                gid="target-line",
            )
        ax.set_xlabel("rank k" + (" (log)" if wide else ""))
        ax.set_ylabel("energy kept E(k)")
        ax.set_ylim(0, 1.02)
        if wide:
            _log_axis(ax.xaxis, ax.set_xscale)
    noisy = any(signals.values())
    _legend(figure, next(iter(axes.values())), [signal_handle()] if noisy else [])
    _block_colorbar(figure, axes, norm, cmap)
    return figure


def _by_kind(kinds: list[str]) -> dict[str, list]:
    """Make an empty list per kind, to gather a panel's artists before drawing them at once."""
    return {kind: [] for kind in kinds}


def _thinned(size: int, log: bool) -> np.ndarray:
    """Pick the 1-based indices of a curve of ``size`` points worth drawing.

    A panel is a few hundred pixels wide, so more than ``MAX_CURVE_POINTS`` points
    per curve only cost time. On a log axis the points are spread evenly in
    log k, so the first ranks, where the curve moves most, keep every point.
    """
    if size <= MAX_CURVE_POINTS:
        return np.arange(1, size + 1)
    spread = (
        np.geomspace(1, size, MAX_CURVE_POINTS) if log else np.linspace(1, size, MAX_CURVE_POINTS)
    )
    return np.unique(np.rint(spread).astype(np.int64))


def _draw_curves(ax, curves: list[tuple[np.ndarray, tuple]]) -> None:
    """One panel's curves as a single LineCollection, then the view fitted to them."""
    if not curves:
        return
    points, colors = zip(*curves, strict=True)
    ax.add_collection(
        LineCollection(points, colors=colors, linewidths=1.0, alpha=0.85, gid="layer-curves")
    )
    ax.autoscale_view()


def _draw_marks(ax, marks: list[tuple[tuple[int, float], tuple]]) -> None:
    """One panel's chosen ranks as a single scatter, ringed in black."""
    if not marks:
        return
    points, colors = zip(*marks, strict=True)
    k, energy = zip(*points, strict=True)
    ax.scatter(
        k, energy, s=16, c=colors, edgecolors="black", linewidths=0.5, zorder=3, gid="chosen-rank"
    )


def _log_axis(axis, set_scale) -> None:
    """Set a log scale with minor ticks at 2 and 5 only, unlabelled.

    Matplotlib's default puts eight labelled minor ticks in every decade; laying
    them out dominated the time to save a figure.
    """
    set_scale("log")
    axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    axis.set_minor_formatter(NullFormatter())


def _spans_a_decade(ranks: list[int]) -> bool:
    """Whether the chosen ranks span a decade or more (then k goes on a log axis)."""
    positive = [rank for rank in ranks if rank > 0]
    return bool(positive) and max(positive) >= 10 * min(positive)


def _legend(figure: Figure, ax, extra: list[Line2D]) -> None:
    """One legend for the target lines, the rank marker and ``extra`` entries, under the title."""
    handles = [line for line in ax.get_lines() if line.get_gid() == "target-line"]
    handles.append(
        Line2D(
            [],
            [],
            marker="o",
            linestyle="none",
            color="#999999",
            markeredgecolor="black",
            markeredgewidth=0.5,
            label="chosen rank",
        )
    )
    handles += extra
    figure.legend(handles=handles, loc="outside upper right", ncols=len(handles), frameon=False)


def _block_colorbar(figure: Figure, axes: dict, norm, cmap) -> None:
    """One colour bar for the block colours."""
    figure.colorbar(
        ScalarMappable(norm=norm, cmap=cmap), ax=list(axes.values()), label="block", shrink=0.8
    )


def singular_value_decay(analysis: Analysis) -> Figure:
    """σᵢ/σ₁ on a log scale per layer, coloured by block, one panel per kind.

    As in :func:`energy_curves`, each panel's curves are one ``LineCollection``
    (gid ``layer-curves``, in the order of ``analysis.layers``). Layers with
    storage noise draw their threshold τ/σ₁ as a dashed line of their colour
    across their indices (one ``LineCollection`` per panel, gid ``noise-threshold``).
    """
    labels = panel_labels(analysis.layers)
    kinds = kinds_in_order(labels.values())
    figure, axes = _panels("Singular-value decay σᵢ/σ₁", kinds)
    color, norm, cmap = _block_colors(analysis.layers)
    curves, thresholds = _by_kind(kinds), _by_kind(kinds)
    for layer in analysis.layers:
        values = layer.spectrum.values
        if values.size == 0 or values[0] == 0:
            continue
        shown = _thinned(values.size, log=True)
        shown = shown[values[shown - 1] > 0]
        relative = values[shown - 1] / values[0]
        curves[labels[layer.module]].append((np.column_stack([shown, relative]), color(layer)))
        segment = threshold_segment(layer)
        if segment is not None:
            thresholds[labels[layer.module]].append((segment, color(layer)))
    for kind, ax in axes.items():
        _log_axis(ax.yaxis, ax.set_yscale)
        _log_axis(ax.xaxis, ax.set_xscale)
        _draw_curves(ax, curves[kind])
        draw_thresholds(ax, thresholds[kind])
        ax.set_xlabel("index i")
        ax.set_ylabel("σᵢ / σ₁")
    if any(thresholds.values()):
        figure.legend(handles=[threshold_handle()], loc="outside upper right", frameon=False)
    _block_colorbar(figure, axes, norm, cmap)
    return figure


def budget_bars(plans: PlanSet) -> Figure:
    """Total LoRA parameters per plan against uniform r = 8/16/64, each with its energy kept."""
    shown = [*plans.chosen, *plans.uniform]
    labels = [rank_plan.rule.label for rank_plan in shown]
    params = [rank_plan.params for rank_plan in shown]
    energies = [rank_plan.energy for rank_plan in shown]
    figure = Figure(figsize=(1.3 * len(labels) + 2, 4.2), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    colors = [OKABE_ITO[0]] * len(plans.chosen) + [OKABE_ITO[1]] * len(plans.uniform)
    bars = ax.bar(labels, params, color=colors)
    for bar, energy in zip(bars, energies, strict=True):
        ax.annotate(
            f"keeps {energy:.1%}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_ylabel("LoRA parameters")
    ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_title("LoRA parameters and energy kept: recommended vs uniform ranks")
    ax.tick_params(axis="x", rotation=20)
    ax.margins(y=0.15)
    return figure


def make_figures(analysis: Analysis, plans: PlanSet) -> Figures:
    """Every figure of an analysis: curves marked with ``plans.marked``, a heat map per plan."""
    figures = {
        "energy-curves": energy_curves(analysis, plans.marked),
        "singular-values": singular_value_decay(analysis),
    }
    stacks = list(dict.fromkeys(x.stack for x in analysis.layers if x.block is not None))
    for rank_plan in plans.chosen:
        for stack in stacks:
            stem = "rank-heatmap-" + rank_plan.rule.label + (f"-{stack}" if stack else "")
            figures[stem.replace(" ", "-").replace(",", "")] = rank_heatmap(rank_plan, stack)
    figures["budget"] = budget_bars(plans)
    return figures


def figure_writers(
    figures: Figures, directory: Path, image_format: str = "png"
) -> dict[Path, Callable[[BinaryIO], object]]:
    """Map DIR/STEM.FORMAT of every figure to the function that writes it."""
    if image_format not in IMAGE_FORMATS:
        raise UsageError(f"unknown image format {image_format!r}; choose png, svg or pdf")
    return {
        directory / f"{stem}.{image_format}": partial(
            figure.savefig, format=image_format, metadata=_metadata(image_format)
        )
        for stem, figure in figures.items()
    }


def write_figures(figures: Figures, directory: Path, image_format: str = "png") -> list[Path]:
    """Save every figure as DIR/STEM.FORMAT, all or none; return the paths in order."""
    writers = figure_writers(figures, directory, image_format)
    with output_directory(directory):
        return write_files_atomically(writers)


def _metadata(image_format: str) -> dict:
    """Drop the creation dates that would make identical figures differ byte for byte."""
    return {"Date": None} if image_format in ("svg", "pdf") else {}


def plot_analysis(
    analysis: Analysis,
    plans: PlanSet,
    directory: str | Path,
    image_format: str = "png",
    report: bool = False,
) -> list[Path]:
    """Write every figure of an analysis (and optionally report.html) into ``directory``.

    Parameters
    ----------
    analysis : Analysis
    plans : PlanSet
        What to mark and map, from :func:`svdrank.ranks.rules.plan_set`.
    directory : str or Path
        Created if missing; files are named ``energy-curves``, ``singular-values``,
        ``rank-heatmap-<plan>`` and ``budget`` with the format's suffix.
    image_format : {"png", "svg", "pdf"}
    report : bool
        Also write ``report.html``, one self-contained file.

    Returns
    -------
    list of Path
        The files written.
    """
    directory = Path(directory)
    writers = plot_writers(analysis, plans, directory, image_format, report)
    with output_directory(directory):
        return write_files_atomically(writers)


def plot_writers(
    analysis: Analysis,
    plans: PlanSet,
    directory: Path,
    image_format: str = "png",
    report: bool = False,
) -> dict[Path, Callable[[BinaryIO], object]]:
    """Draw every figure and map each file of the plot set to the function that writes it.

    For callers that write the figures together with other files, all or none
    (``svdrank diff --plot``); see :func:`plot_analysis` for the parameters.
    """
    figures = make_figures(analysis, plans)
    writers = figure_writers(figures, directory, image_format)
    if report:
        page = html_report(figures, summary_table_html(plans.chosen)).encode("utf-8")
        writers[directory / "report.html"] = lambda stream: stream.write(page)
    return writers
