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
from svdrank.types import (
    METRICS,
    Analysis,
    Constraints,
    LayerRank,
    PlanSet,
    RankPlan,
    RankRule,
    Spectrum,
    check_choice,
)

PRESETS: dict[str, float] = {"conservative": 0.95, "balanced": 0.90, "aggressive": 0.85}
"""Named energy targets."""
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
    """Make the energy rule of a named preset.

    Raises
    ------
    UsageError
        If ``name`` is not a preset.
    """
    check_choice(name, tuple(PRESETS), "preset")
    return RankRule("energy", PRESETS[name], name, preset=name)


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


def answerable_presets(analysis: Analysis) -> list[str]:
    """List the presets whose target the analysis's spectra reach (all, unless truncated low)."""
    return [name for name, target in PRESETS.items() if target <= analysis.max_target]


def standard_rules(analysis: Analysis) -> list[RankRule]:
    """Choose the rules shown when none is asked for: every preset the analysis can answer.

    An analysis run with ``--max-energy`` below every preset gets one energy
    rule at that highest answerable target instead.
    """
    names = answerable_presets(analysis)
    if names:
        return [preset_rule(name) for name in names]
    return [energy_rule(analysis.max_target)]


def default_rule(analysis: Analysis) -> RankRule:
    """Choose the one rule used when a single plan is needed and none was asked for.

    The balanced preset when the analysis can answer it, else the closest
    answerable one: the highest target its spectra reach.
    """
    if PRESETS[DEFAULT_PRESET] <= analysis.max_target:
        return preset_rule(DEFAULT_PRESET)
    return standard_rules(analysis)[0]


def plan_set(analysis: Analysis, chosen: list[RankRule] | None = None) -> PlanSet:
    """Plan the ranks that tables, figures and the report show.

    Parameters
    ----------
    analysis : Analysis
    chosen : list of RankRule, optional
        Default: :func:`standard_rules`. The marked plan is the
        :func:`default_rule`'s when it is among them, else the first.

    Returns
    -------
    PlanSet
        One plan per rule, the marked one, and the uniform-rank plans to
        compare against.
    """
    asked = chosen or standard_rules(analysis)
    plans = tuple(plan(analysis, rule) for rule in asked)
    marked_rule = default_rule(analysis)
    marked = next((item for item in plans if item.rule == marked_rule), plans[0])
    uniform = tuple(plan(analysis, uniform_rule(rank)) for rank in UNIFORM_RANKS)
    return PlanSet(plans, marked, uniform)


def one_plan(analysis: Analysis, plans: list[RankPlan]) -> RankPlan:
    """Pick the plan a single-plan output writes: the only one, else the default rule's."""
    if len(plans) == 1:
        return plans[0]
    default = default_rule(analysis)
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

    Returns
    -------
    RankPlan

    Raises
    ------
    UsageError
        When a spectrum was truncated before the rule's target (the analysis
        was run with a lower ``--max-energy``), or ``nuclear`` meets a
        truncated spectrum.
    """
    metric = metric or analysis.settings.metric
    check_choice(metric, METRICS, "metric")
    constraints = constraints or Constraints()
    layers = []
    for layer in analysis.layers:
        raw = _RAW_RANKS[rule.method](layer.spectrum, rule.value, metric)
        rank = (
            min(raw, min(layer.shape))
            if rule.method == "uniform"
            else constraints.apply(raw, layer)
        )
        layers.append(LayerRank(layer, rank, retained_energy(layer.spectrum, rank, metric)))
    return RankPlan(rule, metric, constraints, tuple(layers))


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
        return [plan_budget(analysis, limit, objective or OBJECTIVES[0], constraints)]
    if objective is not None:
        raise UsageError("--objective applies to --budget or --budget-ratio only")
    asked = rules(analysis, energy, preset, sv_ratio, threshold)
    return [plan(analysis, rule, metric, constraints) for rule in asked]


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
) -> list[RankRule]:
    """Make the rules the options ask for: the one given, or :func:`standard_rules`.

    Parameters
    ----------
    analysis : Analysis
        Decides the standard rules when no option is given.
    energy, preset, sv_ratio, threshold : optional
        At most one of them.

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
    return standard_rules(analysis)
