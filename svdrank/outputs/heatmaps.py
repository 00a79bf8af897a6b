"""Rank heat maps: blocks × kinds of one stack, each cell the recommended rank."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from svdrank.errors import UsageError
from svdrank.inputs.names import kinds_in_order, short_kinds
from svdrank.types import RankPlan

DPI = 120
MAX_TICK_LABELS = 40
ANNOTATE_UP_TO = 100
EXPERT_COLUMNS = ("min", "median", "max")
"""An expert kind's heat-map columns: the spread of its experts' ranks in each block."""


def rank_grid(rank_plan: RankPlan, stack: str = "") -> tuple[list[int], list[str], np.ndarray]:
    """Lay out one stack's ranks as blocks × columns (NaN where a column is absent).

    A kind has one column; a kind whose layers are experts has three, the
    minimum, median and maximum rank over its experts in each block, so the
    spread stays visible however many experts there are.
    """
    in_blocks = [
        item
        for item in rank_plan.layers
        if item.layer.block is not None and item.layer.stack == stack
    ]
    short = short_kinds(item.layer.kind for item in in_blocks)
    experts = {item.layer.kind for item in in_blocks if item.layer.expert is not None}
    cells: dict[tuple[int, str], list[int]] = {}
    for item in in_blocks:
        assert item.layer.block is not None
        cells.setdefault((item.layer.block, item.layer.kind), []).append(item.rank)
    kinds = kinds_in_order(short[kind] for kind in dict.fromkeys(k for _, k in cells))
    by_short = {short[kind]: kind for kind in short}
    columns = [
        f"{label} ({spread})" if by_short[label] in experts else label
        for label in kinds
        for spread in (EXPERT_COLUMNS if by_short[label] in experts else ("",))
    ]
    blocks = sorted({block for block, _ in cells})
    grid = np.full((len(blocks), len(columns)), np.nan)
    for (block, kind), ranks in cells.items():
        row = blocks.index(block)
        if kind in experts:
            start = columns.index(f"{short[kind]} ({EXPERT_COLUMNS[0]})")
            grid[row, start : start + 3] = np.percentile(ranks, [0, 50, 100])
        else:
            grid[row, columns.index(short[kind])] = ranks[0]
    return blocks, columns, grid


def rank_heatmap(rank_plan: RankPlan, stack: str = "") -> Figure:
    """Draw one stack's blocks × kinds, each cell the recommended rank, with a colour bar."""
    blocks, kinds, grid = rank_grid(rank_plan, stack)
    if not blocks:
        raise UsageError("no layer has a block number: a rank heat map needs blocks")
    height = max(3.0, 0.22 * len(blocks) + 1.5)
    figure = Figure(figsize=(1.1 * len(kinds) + 2.5, height), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="cividis", interpolation="nearest")
    figure.colorbar(image, ax=ax, label="rank")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    step = max(1, math.ceil(len(blocks) / MAX_TICK_LABELS))
    ax.set_yticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]])
    ax.set_ylabel("block")
    others = sum(1 for item in rank_plan.layers if item.layer.block is None)
    note = f" ({others} layer{'s' * (others != 1)} outside blocks not shown)" if others else ""
    where = f"{stack}: " if stack else ""
    ax.set_title(f"Recommended ranks — {where}{rank_plan.rule.label}{note}")
    if len(blocks) <= ANNOTATE_UP_TO:
        _annotate_cells(ax, grid, image)
    return figure


def _annotate_cells(ax, grid: np.ndarray, image) -> None:
    """Write each rank in its cell, dark on light cells and light on dark ones."""
    size = 8 if grid.shape[0] <= 40 else 6
    for (row, column), value in np.ndenumerate(grid):
        if np.isnan(value):
            continue
        shade = image.cmap(image.norm(value))
        luminance = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2]
        ax.text(
            column,
            row,
            f"{int(value)}",
            ha="center",
            va="center",
            fontsize=size,
            color="black" if luminance > 0.5 else "white",
            gid="rank-label",
        )
