"""Turn spectra into ranks: presets, energy targets, σ-ratio and threshold rules, clamps.

A RankPlan gives every analysed layer a LoRA rank with what it keeps (its
retained energy) and what it costs (r·(m+n) parameters). Which plans an
analysis can answer, and which plan is shown or written when none is asked
for, is decided here once, for every command and output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from svdrank.errors import UsageError
from svdrank.inputs.names import ModuleName, selected
from svdrank.ranks.budget import OBJECTIVES, parse_count, plan_budget
from svdrank.spectra.energy import (
    check_sv_ratio,
    check_target,
    check_threshold,
    rank_at,
    rank_by_sv_ratio,
    rank_by_threshold,
    retained_energy,
)
from svdrank.spectra.signal import clean_spectrum
from svdrank.types import (
    METRICS,
    RANK_NOISE_MODES,
    Analysis,
    Constraints,
    LayerRank,
    LayerResult,
    PlanSet,
    RankPlan,
    RankRule,
    Spectrum,
    check_choice,
)

PRESETS: dict[str, float] = {"conservative": 0.95, "balanced": 0.90, "aggressive": 0.85}
"""Named energy targets."""
SIGNAL_PRESET = "signal"
"""The preset whose rank is the signal rank r_s itself (storage noise on)."""
DEFAULT_PRESET = "balanced"
"""The plan written when a single plan is needed and none was asked for."""
UNIFORM_RANKS = (8, 16, 64)
"""The fixed ranks people pick by habit; tables and plots show what each would keep."""

_RAW_RANKS: dict[str, Callable[[Spectrum, float, str], int]] = {
    "energy": lambda spectrum, target, metric: rank_at(spectrum, target, metric),
    "sv_ratio": lambda spectrum, ratio, _metric: rank_by_sv_ratio(spectrum, ratio),
    "threshold": lambda spectrum, floor, _metric: rank_by_threshold(spectrum, floor),
    "uniform": lambda _spectrum, rank, _metric: int(rank),
}


def preset_rule(name: str) -> RankRule:
    """Make the rule of a named preset: an energy target, or the signal rank.

    Raises
    ------
    UsageError
        If ``name`` is not a preset.
    """
    check_choice(name, (*PRESETS, SIGNAL_PRESET), "preset")
    if name == SIGNAL_PRESET:
        return RankRule("signal", 0.0, name, preset=name)
    return RankRule("energy", PRESETS[name], name, preset=name)


def noise_view(analysis: Analysis, noise: str = "auto", metric: str | None = None) -> Analysis:
    """Give the analysis whose spectra the rank rules read.

    With ``noise="auto"`` and the ``fro`` metric, each layer that has a storage
    noise floor gets its clean spectrum (see
    :func:`svdrank.spectra.signal.clean_spectrum`): energy shares count the
    clean update and ranks stop at the signal rank. Otherwise (``off``, the
    ``nuclear`` metric, layers without a floor) the raw spectra stay.

    Raises
    ------
    UsageError
        For an unknown noise mode.
    """
    check_choice(noise, RANK_NOISE_MODES, "noise mode")
    if noise == "off" or (metric or analysis.settings.metric) == "nuclear":
        return analysis
    if all(layer.noise is None for layer in analysis.layers):
        return analysis
    layers = tuple(replace(layer, spectrum=clean_spectrum(layer)) for layer in analysis.layers)
    return replace(analysis, layers=layers)


def energy_rule(target: float) -> RankRule:
    """Make the energy rule of a custom target.

    Raises
    ------
    UsageError
        If the target is outside (0, 1].
    """
    check_target(target)
    return RankRule("energy", target, f"energy {target:g}")


def sv_ratio_rule(ratio: float) -> RankRule:
    """Keep the σᵢ ≥ σ₁ / ratio (kohya's ``sv_ratio``); ratio ≥ 1."""
    check_sv_ratio(ratio)
    return RankRule("sv_ratio", ratio, f"sv-ratio {ratio:g}")


def threshold_rule(threshold: float) -> RankRule:
    """Keep the σᵢ ≥ threshold (LyCORIS' absolute threshold); threshold > 0."""
    check_threshold(threshold)
    return RankRule("threshold", threshold, f"threshold {threshold:g}")


def uniform_rule(rank: int) -> RankRule:
    """One rank for every layer (capped at min(m, n)); rank ≥ 1.

    What a habitual ``r=8`` LoRA spends: every layer gets it, changed or not,
    and clamps do not apply.
    """
    if rank < 1:
        raise UsageError(f"a uniform rank must be ≥ 1, got {rank}")
    return RankRule("uniform", float(rank), f"uniform r={rank}")


def answerable_presets(analysis: Analysis, noise: str = "auto") -> list[str]:
    """List the presets whose target the analysis's spectra reach (all, unless truncated low)."""
    reach = noise_view(analysis, noise).max_target
    return [name for name, target in PRESETS.items() if target <= reach]


def standard_rules(analysis: Analysis, noise: str = "auto") -> list[RankRule]:
    """Choose the rules shown when none is asked for: every preset the analysis can answer.

    An analysis run with ``--max-energy`` below every preset gets one energy
    rule at that highest answerable target instead.
    """
    names = answerable_presets(analysis, noise)
    if names:
        return [preset_rule(name) for name in names]
    if noise == "off" and any(layer.noise is not None for layer in analysis.layers):
        raise UsageError(
            "with --noise off ranks come from the raw spectra, and this analysis stopped "
            f"them at the noise threshold (they hold {analysis.max_target:.0%} of ‖ΔW‖²); "
            "run `svdrank diff --noise off` for raw ranks"
        )
    return [energy_rule(noise_view(analysis, noise).max_target)]


def default_rule(analysis: Analysis, noise: str = "auto") -> RankRule:
    """Choose the one rule used when a single plan is needed and none was asked for.

    The balanced preset when the analysis can answer it, else the closest
    answerable one: the highest target its spectra reach.
    """
    if PRESETS[DEFAULT_PRESET] <= noise_view(analysis, noise).max_target:
        return preset_rule(DEFAULT_PRESET)
    return standard_rules(analysis, noise)[0]


def plan_set(
    analysis: Analysis, chosen: list[RankRule] | None = None, noise: str = "auto"
) -> PlanSet:
    """Plan the ranks that tables, figures and the report show.

    Parameters
    ----------
    analysis : Analysis
    chosen : list of RankRule, optional
        Default: :func:`standard_rules`. The marked plan is the
        :func:`default_rule`'s when it is among them, else the first.
    noise : {"auto", "off"}
        Whether ranks count the clean update (see :func:`noise_view`).

    Returns
    -------
    PlanSet
        One plan per rule, the marked one, and the uniform-rank plans to
        compare against.
    """
    asked = chosen or standard_rules(analysis, noise)
    plans = tuple(plan(analysis, rule, noise=noise) for rule in asked)
    marked_rule = default_rule(analysis, noise)
    marked = next((item for item in plans if item.rule == marked_rule), plans[0])
    uniform = tuple(plan(analysis, uniform_rule(rank), noise=noise) for rank in UNIFORM_RANKS)
    return PlanSet(plans, marked, uniform)


def one_plan(analysis: Analysis, plans: list[RankPlan], noise: str = "auto") -> RankPlan:
    """Pick the plan a single-plan output writes: the only one, else the default rule's."""
    if len(plans) == 1:
        return plans[0]
    default = default_rule(analysis, noise)
    return next(item for item in plans if item.rule == default)


def select_layers(analysis: Analysis, include: Sequence[str]) -> Analysis:
    """Restrict an analysis to the modules matching any of the glob patterns.

    Parameters
    ----------
    analysis : Analysis
    include : sequence of str
        ``fnmatch`` patterns matched against full module names, or
        ``FIELD=GLOB`` on a layer's stack, block, expert or kind (see
        :func:`svdrank.inputs.names.selected`); none keeps every layer.

    Returns
    -------
    Analysis
        The same analysis with only the matching layers.

    Raises
    ------
    UsageError
        When no module matches.
    """
    if not include:
        return analysis
    layers = tuple(
        layer
        for layer in analysis.layers
        if selected(
            layer.module,
            include,
            (),
            ModuleName(layer.stack, layer.block, layer.expert, layer.kind),
        )
    )
    if not layers:
        raise UsageError(f"no analysed module matches {', '.join(include)}")
    return replace(analysis, layers=layers)


def plan(
    analysis: Analysis,
    rule: RankRule,
    metric: str | None = None,
    constraints: Constraints | None = None,
    noise: str = "auto",
) -> RankPlan:
    """Give every layer of an analysis a rank under ``rule``.

    Parameters
    ----------
    analysis : Analysis
    rule : RankRule
        From :func:`preset_rule`, :func:`energy_rule`, :func:`sv_ratio_rule` or
        :func:`threshold_rule` (budgets: :func:`~svdrank.ranks.budget.plan_budget`).
    metric : {"fro", "nuclear"}, optional
        Defaults to the metric the analysis was run with.
    constraints : Constraints, optional
    noise : {"auto", "off"}
        ``auto``: layers with a storage noise floor are ranked on their clean
        spectrum (see :func:`noise_view`), and each LayerRank also carries the
        raw spectrum's rank where that spectrum answers the rule.

    Returns
    -------
    RankPlan

    Raises
    ------
    UsageError
        When a spectrum was truncated before the rule's target (the analysis
        was run with a lower ``--max-energy``, or stopped at the noise
        threshold and ``noise`` is ``off``), ``nuclear`` meets a truncated
        spectrum, or the signal preset meets a layer without a noise floor.
    """
    metric = metric or analysis.settings.metric
    check_choice(metric, METRICS, "metric")
    constraints = constraints or Constraints()
    view = noise_view(analysis, noise, metric)
    layers = []
    for stored, layer in zip(analysis.layers, view.layers, strict=True):
        rank = _rule_rank(rule, layer, metric, constraints)
        raw_rank = rank if layer is stored else _raw_rank(rule, stored, metric, constraints)
        energy = retained_energy(layer.spectrum, rank, metric)
        layers.append(LayerRank(layer, rank, energy, raw_rank))
    return RankPlan(rule, metric, constraints, tuple(layers))


def _rule_rank(rule: RankRule, layer: LayerResult, metric: str, constraints: Constraints) -> int:
    """One layer's rank under ``rule``, clamped (uniform ranks are only capped at min(m, n))."""
    if rule.method == "uniform":
        return min(int(rule.value), min(layer.shape))
    if rule.method == "signal":
        if layer.noise is None:
            raise UsageError(
                f"{layer.module}: no storage noise floor (F32/F64 inputs, an adapter, or "
                "`--noise off`), so it has no signal rank; use an energy preset"
            )
        return constraints.apply(layer.noise.signal_rank, layer)
    try:
        raw = _RAW_RANKS[rule.method](layer.spectrum, rule.value, metric)
    except UsageError as exc:
        if layer.noise is None or layer.spectrum.noise_limited:
            raise
        raise UsageError(
            f"{layer.module}: its spectrum stopped at the noise threshold, so raw ranks are "
            f"known up to {retained_energy(layer.spectrum, layer.spectrum.k):.0%} of ‖ΔW‖²; "
            "run `svdrank diff --noise off` for raw ranks"
        ) from exc
    return constraints.apply(raw, layer)


def _raw_rank(
    rule: RankRule, layer: LayerResult, metric: str, constraints: Constraints
) -> int | None:
    """Read the rank ``rule`` gives on a layer's raw spectrum; None where it cannot say."""
    if rule.method not in _RAW_RANKS:
        return None
    try:
        return _rule_rank(rule, layer, metric, constraints)
    except UsageError:
        return None


def recommend(
    analysis: Analysis,
    *,
    energy: float | None = None,
    preset: str | None = None,
    sv_ratio: float | None = None,
    threshold: float | None = None,
    budget: int | str | None = None,
    budget_ratio: float | None = None,
    objective: str | None = None,
    metric: str | None = None,
    min_rank: int = 0,
    max_rank: int | None = None,
    multiple_of: int = 1,
    noise: str = "auto",
) -> list[RankPlan]:
    """Recommend per-layer LoRA ranks from an analysis.

    Give at most one of ``energy``, ``preset``, ``sv_ratio``, ``threshold``,
    ``budget`` and ``budget_ratio``; with none, the presets the analysis can
    answer (conservative, balanced, aggressive) come back side by side.

    Parameters
    ----------
    analysis : Analysis
        From :func:`~svdrank.analyze` or :func:`~svdrank.load_analysis`.
    energy : float, optional
        Energy target in (0, 1].
    preset : {"conservative", "balanced", "aggressive"}, optional
    sv_ratio : float, optional
        Keep the σᵢ ≥ σ₁ / ratio (kohya's ``sv_ratio``).
    threshold : float, optional
        Keep the σᵢ ≥ threshold.
    budget : int or str, optional
        At most this many LoRA parameters (``"20M"`` works); see
        :func:`~svdrank.ranks.budget.plan_budget`.
    budget_ratio : float, optional
        A budget as this share of the analysed layers' parameters.
    objective : {"energy", "relative"}, optional
        What a budget maximises (default ``energy``): the energy kept overall,
        or the sum of per-layer energy fractions. Only with a budget.
    metric : {"fro", "nuclear"}, optional
        Default: the analysis's metric. Budgets count Σσ² and refuse ``nuclear``.
    min_rank, max_rank, multiple_of : int
        Clamps; see :class:`~svdrank.types.Constraints`.
    noise : {"auto", "off"}
        ``auto`` (default): for layers stored on a BF16, F16 or F8 grid, energy
        targets and budgets count the clean update only and ranks never go
        past the signal rank r_s; ``preset="signal"`` gives r_s itself.
        ``off``: ranks of the raw spectrum.

    Returns
    -------
    list of RankPlan

    Raises
    ------
    UsageError
        For contradictory or out-of-range options, or a target the analysis
        cannot answer.

    Examples
    --------
    >>> from svdrank import analyze, recommend
    >>> analysis = analyze("sample_checkpoints/base.safetensors",
    ...                    "sample_checkpoints/tuned.safetensors")
    >>> [p.rule.label for p in recommend(analysis)]
    ['conservative', 'balanced', 'aggressive']
    """
    constraints = Constraints(min_rank, max_rank, multiple_of)
    limit = _budget(analysis, budget, budget_ratio, [energy, preset, sv_ratio, threshold])
    if limit is not None:
        if metric == "nuclear" or (metric is None and analysis.settings.metric == "nuclear"):
            raise UsageError(
                "budgets keep the most Σσ² (fro); --metric nuclear does not apply to "
                "--budget/--budget-ratio"
            )
        view = noise_view(analysis, noise, "fro")
        return [plan_budget(view, limit, objective or OBJECTIVES[0], constraints)]
    if objective is not None:
        raise UsageError("--objective applies to --budget or --budget-ratio only")
    asked = rules(analysis, energy, preset, sv_ratio, threshold, noise)
    return [plan(analysis, rule, metric, constraints, noise) for rule in asked]


def _budget(
    analysis: Analysis, budget: int | str | None, share: float | None, others: list
) -> int | None:
    """Return the parameter budget the options ask for, if any."""
    if budget is None and share is None:
        return None
    if (budget is not None and share is not None) or any(v is not None for v in others):
        raise UsageError(
            "give only one of --energy, --preset, --sv-ratio, --threshold, --budget, --budget-ratio"
        )
    if budget is not None:
        return parse_count(budget)
    assert share is not None
    if not 0.0 < share <= 1.0:
        raise UsageError(f"--budget-ratio must be in (0, 1], got {share}")
    return int(share * sum(layer.full_params for layer in analysis.layers))


def rules(
    analysis: Analysis,
    energy: float | None = None,
    preset: str | None = None,
    sv_ratio: float | None = None,
    threshold: float | None = None,
    noise: str = "auto",
) -> list[RankRule]:
    """Make the rules the options ask for: the one given, or :func:`standard_rules`.

    Parameters
    ----------
    analysis : Analysis
        Decides the standard rules when no option is given.
    energy, preset, sv_ratio, threshold : optional
        At most one of them.
    noise : {"auto", "off"}
        Decides, with the analysis, which presets can be answered.

    Returns
    -------
    list of RankRule

    Raises
    ------
    UsageError
        If more than one option is given or its value is out of range.
    """
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
        return [energy_rule(energy)]
    if preset is not None:
        return [preset_rule(preset)]
    if sv_ratio is not None:
        return [sv_ratio_rule(sv_ratio)]
    if threshold is not None:
        return [threshold_rule(threshold)]
    return standard_rules(analysis, noise)
