"""Storage-noise marks on the figures: each layer's threshold τ and its signal rank r_s.

Drawn only for layers with a noise floor, in the layer's colour and as one
artist per panel, like the curves they annotate; figures of F32 checkpoints
and adapters stay as they were.
"""

from __future__ import annotations

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.lines import Line2D

from svdrank.types import LayerResult

LINE_WIDTH = 0.8
"""Width of the dashed τ lines and of the edge of the hollow r_s diamonds."""


def threshold_segment(layer: LayerResult) -> np.ndarray | None:
    """Return τ/σ₁ across the layer's indices 1…k as two (i, y) points; None without a floor."""
    noise, values = layer.noise, layer.spectrum.values
    if noise is None or noise.threshold <= 0 or values.size == 0 or values[0] == 0:
        return None
    level = noise.threshold / values[0]
    return np.array([[1.0, level], [float(values.size), level]])


def signal_point(layer: LayerResult, curve: np.ndarray) -> tuple[int, float] | None:
    """Return (r_s, E(r_s)) on the layer's energy curve; None without a floor or for r_s = 0."""
    noise = layer.noise
    if noise is None or noise.signal_rank == 0 or curve.size == 0:
        return None
    rank = min(noise.signal_rank, curve.size)
    return rank, float(curve[rank - 1])


def draw_thresholds(ax, segments: list[tuple[np.ndarray, tuple]]) -> None:
    """Draw one panel's τ lines as a single dashed LineCollection (gid ``noise-threshold``)."""
    if not segments:
        return
    points, colors = zip(*segments, strict=True)
    ax.add_collection(
        LineCollection(
            points,
            colors=colors,
            linestyles="--",
            linewidths=LINE_WIDTH,
            gid="noise-threshold",
        )
    )
    ax.autoscale_view()


def draw_signal_marks(ax, marks: list[tuple[tuple[int, float], tuple]]) -> None:
    """Mark one panel's signal ranks as one scatter of hollow diamonds (gid ``signal-rank``)."""
    if not marks:
        return
    points, colors = zip(*marks, strict=True)
    k, energy = zip(*points, strict=True)
    ax.scatter(
        k,
        energy,
        s=22,
        marker="D",
        facecolors="none",
        edgecolors=colors,
        linewidths=LINE_WIDTH,
        zorder=3,
        gid="signal-rank",
    )


def threshold_handle() -> Line2D:
    """Make the legend entry of the τ lines."""
    return Line2D(
        [], [], color="#999999", linestyle="--", linewidth=LINE_WIDTH, label="noise threshold τ"
    )


def signal_handle() -> Line2D:
    """Make the legend entry of the signal-rank marks."""
    return Line2D(
        [],
        [],
        marker="D",
        linestyle="none",
        markerfacecolor="none",
        markeredgecolor="#555555",
        markeredgewidth=LINE_WIDTH,
        label="signal rank r_s",
    )
