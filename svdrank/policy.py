"""Turn spectra into ranks: presets, energy targets, σ-ratio and threshold modes, clamps.

A RankPlan gives every analysed layer a LoRA rank with what it keeps (its
retained energy) and what it costs (r·(m+n) parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from svdrank.analysis import Analysis, LayerResult
from svdrank.analysis_file import load_analysis
from svdrank.energy import (
    check_target,
    rank_at,
    rank_by_sv_ratio,
    rank_by_threshold,
    retained_energy,
)
from svdrank.engines import Spectrum
from svdrank.errors import UsageError

PRESETS: dict[str, float] = {"conservative": 0.95, "balanced": 0.90, "aggressive": 0.85}
DEFAULT_PRESET = "balanced"


@dataclass(frozen=True)
class Constraints:
    """Clamps applied after a mode picks a raw rank.

    ``min_rank`` applies to every layer with a non-zero update (a zero update
    needs no adapter and stays at 0); ``multiple_of`` rounds up; ``max_rank``
    caps; no rank exceeds min(m, n).
    """

    min_rank: int = 0
    max_rank: int | None = None
    multiple_of: int = 1

    def __post_init__(self) -> None:
        if self.min_rank < 0 or self.multiple_of < 1:
            raise UsageError("--min-rank must be ≥ 0 and --multiple-of ≥ 1")
        if self.max_rank is not None and self.max_rank < max(self.min_rank, 1):
            raise UsageError(f"--max-rank {self.max_rank} is below --min-rank {self.min_rank}")

    def apply(self, rank: int, layer: LayerResult) -> int:
        """The clamped rank of a layer whose mode gave ``rank``."""
        if layer.spectrum.total_energy == 0.0:
            return 0
        shape = layer.shape
        rank = max(rank, self.min_rank)
        if rank > 0:
            rank = math.ceil(rank / self.multiple_of) * self.multiple_of
        if self.max_rank is not None:
            rank = min(rank, self.max_rank)
        return min(rank, min(shape))


@dataclass(frozen=True)
class Mode:
    """How a raw rank is chosen: ``energy`` (a target), ``sv_ratio`` or ``threshold``."""

    kind: str
    value: float
    label: str

    def raw_rank(self, spectrum: Spectrum, metric: str) -> int:
        """The rank this mode gives one spectrum, before clamps."""
        return _MODE_RANKS[self.kind](spectrum, self.value, metric)


_MODE_RANKS: dict[str, Callable[[Spectrum, float, str], int]] = {
    "energy": lambda spectrum, target, metric: rank_at(spectrum, target, metric),
    "sv_ratio": lambda spectrum, ratio, _metric: rank_by_sv_ratio(spectrum, ratio),
    "threshold": lambda spectrum, floor, _metric: rank_by_threshold(spectrum, floor),
}


def preset_mode(name: str) -> Mode:
    """The energy mode of a named preset."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Mode("energy", PRESETS[name], name)


def energy_mode(target: float) -> Mode:
    """The energy mode of a custom target in (0, 1]."""
    check_target(target)
    return Mode("energy", target, f"energy {target:g}")


@dataclass(frozen=True)
class LayerRank:
    """One layer's recommended rank, what it keeps and what it costs."""

    layer: LayerResult
    rank: int
    energy: float

    @property
    def params(self) -> int:
        """LoRA parameters of this rank: r·(m+n)."""
        return self.rank * sum(self.layer.shape)


@dataclass(frozen=True)
class RankPlan:
    """Ranks for every layer under one mode, metric and set of constraints."""

    mode: Mode
    metric: str
    constraints: Constraints
    layers: tuple[LayerRank, ...]

    @property
    def params(self) -> int:
        """Total LoRA parameters."""
        return sum(item.params for item in self.layers)

    @property
    def full_params(self) -> int:
        """Parameters full fine-tuning trains in the same layers."""
        return sum(item.layer.full_params for item in self.layers)

    @property
    def energy(self) -> float:
        """Share of the whole update's energy kept: Σ E_i·‖ΔW_i‖² / Σ‖ΔW_i‖² (fro)."""
        total = sum(item.layer.spectrum.total_energy for item in self.layers)
        if total == 0.0:
            return 1.0
        kept = sum(
            retained_energy(item.layer.spectrum, item.rank) * item.layer.spectrum.total_energy
            for item in self.layers
        )
        return kept / total


def plan(
    analysis: Analysis,
    mode: Mode,
    metric: str | None = None,
    constraints: Constraints | None = None,
) -> RankPlan:
    """Give every layer of an analysis a rank under ``mode``.

    Parameters
    ----------
    analysis : Analysis
    mode : Mode
        From :func:`preset_mode`, :func:`energy_mode`, or ``Mode("sv_ratio", R, …)``
        / ``Mode("threshold", T, …)``.
    metric : {"fro", "nuclear"}, optional
        Defaults to the metric the analysis was run with.
    constraints : Constraints, optional

    Returns
    -------
    RankPlan
    """
    metric = metric or analysis.settings.metric
    constraints = constraints or Constraints()
    layers = []
    for layer in analysis.layers:
        rank = constraints.apply(mode.raw_rank(layer.spectrum, metric), layer)
        layers.append(LayerRank(layer, rank, retained_energy(layer.spectrum, rank, metric)))
    return RankPlan(mode, metric, constraints, tuple(layers))


def recommend(
    analysis: Analysis | str | None = None,
    *,
    energy: float | None = None,
    preset: str | None = None,
    sv_ratio: float | None = None,
    threshold: float | None = None,
    budget: int | str | None = None,
    budget_ratio: float | None = None,
    objective: str = "energy",
    metric: str | None = None,
    min_rank: int = 0,
    max_rank: int | None = None,
    multiple_of: int = 1,
) -> list[RankPlan]:
    """Recommend per-layer LoRA ranks from an analysis.

    Give at most one of ``energy``, ``preset``, ``sv_ratio``, ``threshold``,
    ``budget`` and ``budget_ratio``; with none, the three presets
    (conservative, balanced, aggressive) come back side by side.

    Parameters
    ----------
    analysis : Analysis or path, optional
        An Analysis, or the path of an analysis file (default
        ``svdrank-analysis.json``).
    energy : float, optional
        Energy target in (0, 1].
    preset : {"conservative", "balanced", "aggressive"}, optional
    sv_ratio : float, optional
        Keep the σᵢ ≥ σ₁ / ratio (kohya's ``sv_ratio``).
    threshold : float, optional
        Keep the σᵢ ≥ threshold.
    budget : int or str, optional
        At most this many LoRA parameters (``"20M"`` works); see :func:`plan_budget`.
    budget_ratio : float, optional
        A budget as this share of the analysed layers' parameters.
    objective : {"energy", "relative"}
        What a budget maximises: the energy kept overall, or the sum of
        per-layer energy fractions.
    metric : {"fro", "nuclear"}, optional
    min_rank, max_rank, multiple_of : int
        Clamps; see :class:`Constraints`.

    Returns
    -------
    list of RankPlan

    Examples
    --------
    >>> from svdrank import analyze, recommend
    >>> analysis = analyze("sample_checkpoints/base.safetensors",
    ...                    "sample_checkpoints/tuned.safetensors")
    >>> [p.mode.label for p in recommend(analysis)]
    ['conservative', 'balanced', 'aggressive']
    """
    if not isinstance(analysis, Analysis):
        analysis = load_analysis(analysis) if analysis is not None else load_analysis()
    constraints = Constraints(min_rank, max_rank, multiple_of)
    limit = _budget(analysis, budget, budget_ratio, [energy, preset, sv_ratio, threshold])
    if limit is not None:
        return [plan_budget(analysis, limit, objective, constraints)]
    return [
        plan(analysis, mode, metric, constraints)
        for mode in modes(energy, preset, sv_ratio, threshold)
    ]


def _budget(
    analysis: Analysis, budget: int | str | None, ratio: float | None, others: list
) -> int | None:
    """The parameter budget the options ask for, if any."""
    if budget is None and ratio is None:
        return None
    if (budget is not None and ratio is not None) or any(v is not None for v in others):
        raise UsageError(
            "give only one of --energy, --preset, --sv-ratio, --threshold, --budget, --budget-ratio"
        )
    if budget is not None:
        return parse_count(budget)
    if not 0.0 < ratio <= 1.0:
        raise UsageError(f"--budget-ratio must be in (0, 1], got {ratio}")
    return int(ratio * sum(layer.full_params for layer in analysis.layers))


def modes(
    energy: float | None,
    preset: str | None,
    sv_ratio: float | None,
    threshold: float | None,
) -> list[Mode]:
    """The modes the options ask for: one of them, or the three presets."""
    given = [
        option
        for option, value in (
            ("--energy", energy),
            ("--preset", preset),
            ("--sv-ratio", sv_ratio),
            ("--threshold", threshold),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise UsageError(f"give only one of {', '.join(given)}")
    if energy is not None:
        return [energy_mode(energy)]
    if preset is not None:
        return [preset_mode(preset)]
    if sv_ratio is not None:
        return [Mode("sv_ratio", sv_ratio, f"sv-ratio {sv_ratio:g}")]
    if threshold is not None:
        return [Mode("threshold", threshold, f"threshold {threshold:g}")]
    return [preset_mode(name) for name in PRESETS]


OBJECTIVES = ("energy", "relative")
_COUNT_SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "m": 1e6, "B": 1e9, "G": 1e9, "b": 1e9}


def parse_count(text: str | float | int, what: str = "--budget") -> int:
    """A parameter count such as ``20M``, ``1.5e6``, ``300k`` or ``4096`` as an int.

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
    ratio: np.ndarray


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
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}; choose energy or relative")
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
    mode = Mode("budget", float(budget), f"budget {budget:,}")
    return RankPlan(mode, "fro", constraints, layers)


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
        ratio = np.minimum.accumulate(gain / cost)
        parts.append((np.full(size.size, index), np.arange(size.size), size, cost, ratio))
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
    """Buy steps best-ratio first (per layer in order), then fill with cheaper ones that fit."""
    ranks = list(floors)
    order = np.lexsort((steps.order, steps.layer, -steps.ratio))
    next_step = {}
    left = budget
    for position in order:
        layer = int(steps.layer[position])
        if steps.order[position] != next_step.get(layer, 0) or steps.cost[position] > left:
            continue
        left -= int(steps.cost[position])
        ranks[layer] += int(steps.size[position])
        next_step[layer] = int(steps.order[position]) + 1
    return ranks
