"""Turn spectra into ranks: presets, energy targets, σ-ratio and threshold modes, clamps.

A RankPlan gives every analysed layer a LoRA rank with what it keeps (its
retained energy) and what it costs (r·(m+n) parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from svdrank.analysis import Analysis, LayerResult, load_analysis
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
    metric: str | None = None,
    min_rank: int = 0,
    max_rank: int | None = None,
    multiple_of: int = 1,
) -> list[RankPlan]:
    """Recommend per-layer LoRA ranks from an analysis.

    Give at most one of ``energy``, ``preset``, ``sv_ratio`` and ``threshold``;
    with none, the three presets (conservative, balanced, aggressive) come back
    side by side.

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
    return [
        plan(analysis, mode, metric, constraints)
        for mode in modes(energy, preset, sv_ratio, threshold)
    ]


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
