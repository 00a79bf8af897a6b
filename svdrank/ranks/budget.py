"""Parameter budgets: the ranks that keep the most energy within Σ r·(m+n) ≤ N."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from svdrank.errors import UsageError
from svdrank.spectra.energy import retained_energy
from svdrank.types import (
    Analysis,
    Constraints,
    LayerRank,
    RankPlan,
    RankRule,
    check_choice,
)

OBJECTIVES = ("energy", "relative")
"""What a budget maximises: the energy kept overall, or the sum of per-layer energy shares."""
_COUNT_SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "m": 1e6, "B": 1e9, "G": 1e9, "b": 1e9}


def parse_count(text: str | float | int, what: str = "--budget") -> int:
    """Parse a parameter count such as ``20M``, ``1.5e6``, ``300k`` or ``4096``.

    Parameters
    ----------
    text : str, float or int
        A number, optionally with ``_`` or ``,`` separators and a suffix
        ``k``/``K`` (10³), ``M``/``m`` (10⁶) or ``B``/``b``/``G`` (10⁹).
    what : str
        The option named in error messages.

    Returns
    -------
    int
        The count, rounded down.

    Raises
    ------
    UsageError
        If the text is not a positive count.
    """
    if isinstance(text, int | float):
        value = float(text)
    else:
        stripped = text.strip().replace("_", "").replace(",", "")
        scale = _COUNT_SUFFIXES.get(stripped[-1:], 1.0)
        number = stripped[:-1] if stripped[-1:] in _COUNT_SUFFIXES else stripped
        try:
            value = float(number) * scale
        except ValueError:
            raise UsageError(f"{what} {text!r} is not a count (e.g. 20M, 1.5e6, 300k)") from None
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{what} must be a positive count, got {text!r}")
    return int(value)


@dataclass(frozen=True)
class _Steps:
    """Every rank step a budget allocation may buy, as parallel arrays."""

    layer: np.ndarray
    order: np.ndarray
    size: np.ndarray
    cost: np.ndarray
    gain_per_param: np.ndarray


def plan_budget(
    analysis: Analysis,
    budget: int,
    objective: str = "energy",
    constraints: Constraints | None = None,
) -> RankPlan:
    """Ranks that keep the most energy with Σ r·(m+n) ≤ budget.

    Greedy by marginal gain per parameter: each layer's next rank step (of
    ``multiple_of`` ranks) gains the σᵢ² it adds (``objective="energy"``) or
    that over ‖ΔW‖² (``"relative"``: the sum of per-layer energy fractions) and
    costs size·(m+n). Gains never increase along a layer (σ is sorted), so the
    greedy order is globally sorted and, with equal costs per rank, optimal;
    with mixed layer widths it is the knapsack's greedy, optimal for the
    continuous relaxation and within one step's gain of the integer optimum.
    A final pass adds the cheaper steps that still fit. Ranks never go beyond
    the singular values the analysis computed.

    Raises
    ------
    UsageError
        If the ``min_rank`` floor alone costs more than the budget, or the
        objective is unknown.
    """
    check_choice(objective, OBJECTIVES, "objective")
    constraints = constraints or Constraints()
    floors = [
        constraints.apply(0, layer) if constraints.min_rank else 0 for layer in analysis.layers
    ]
    spent = sum(
        rank * sum(layer.shape) for rank, layer in zip(floors, analysis.layers, strict=True)
    )
    if spent > budget:
        raise UsageError(
            f"--min-rank {constraints.min_rank} alone costs {spent:,} parameters, "
            f"more than the budget of {budget:,}"
        )
    steps = _budget_steps(analysis, floors, constraints, objective)
    ranks = _take_steps(steps, floors, budget - spent)
    layers = tuple(
        LayerRank(layer, rank, retained_energy(layer.spectrum, rank))
        for layer, rank in zip(analysis.layers, ranks, strict=True)
    )
    rule = RankRule("budget", float(budget), f"budget {budget:,}", objective=objective)
    return RankPlan(rule, "fro", constraints, layers)


def _budget_steps(
    analysis: Analysis, floors: list[int], constraints: Constraints, objective: str
) -> _Steps:
    """Every purchasable rank step of every layer, with its size, cost and gain per parameter."""
    parts: list[tuple[np.ndarray, ...]] = []
    for index, (layer, floor) in enumerate(zip(analysis.layers, floors, strict=True)):
        spectrum = layer.spectrum
        ceiling = min(spectrum.k, constraints.max_rank or spectrum.k, min(layer.shape))
        if spectrum.total_energy == 0.0 or ceiling <= floor:
            continue
        edges = _step_edges(floor, ceiling, constraints.multiple_of)
        energy = np.concatenate([[0.0], np.cumsum(np.square(spectrum.values, dtype=np.float64))])
        gain = energy[edges[1:]] - energy[edges[:-1]]
        if objective == "relative":
            gain /= spectrum.total_energy
        size = np.diff(edges)
        cost = size * sum(layer.shape)
        # Gain per parameter never rises along a layer; the running minimum
        # removes rounding that would otherwise put a later step first.
        gain_per_param = np.minimum.accumulate(gain / cost)
        parts.append(
            (np.full(size.size, index), np.arange(size.size), size, cost, gain_per_param)
        )
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return _Steps(empty, empty, empty, empty, np.zeros(0))
    return _Steps(*(np.concatenate(column) for column in zip(*parts, strict=True)))


def _step_edges(floor: int, ceiling: int, multiple_of: int) -> np.ndarray:
    """Rank boundaries from floor to ceiling on the multiple_of grid (ceiling last)."""
    first = math.ceil(max(floor + 1, 1) / multiple_of) * multiple_of
    grid = np.arange(first, ceiling + 1, multiple_of)
    edges = np.unique(np.concatenate([[floor], grid, [ceiling]]))
    return edges.astype(np.int64)


def _take_steps(steps: _Steps, floors: list[int], budget: int) -> list[int]:
    """Buy steps best gain per parameter first (per layer in order), then cheaper ones that fit."""
    ranks = list(floors)
    order = np.lexsort((steps.order, steps.layer, -steps.gain_per_param))
    next_step: dict[int, int] = {}
    left = budget
    for position in order:
        layer = int(steps.layer[position])
        if steps.order[position] != next_step.get(layer, 0) or steps.cost[position] > left:
            continue
        left -= int(steps.cost[position])
        ranks[layer] += int(steps.size[position])
        next_step[layer] = int(steps.order[position]) + 1
    return ranks
