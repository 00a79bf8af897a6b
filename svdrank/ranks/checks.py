"""The CI gate's judgement: whether an allocation of ranks stays within its limits.

Reading the config or adapter into an :class:`~svdrank.types.Allocation` is
the formats stage's job (:mod:`svdrank.outputs.configs`); rendering the report
is too. This module only judges.
"""

from __future__ import annotations

from svdrank.errors import UsageError
from svdrank.inputs.names import same_module
from svdrank.ranks.rules import noise_view
from svdrank.spectra.energy import check_target, retained_energy
from svdrank.types import Allocation, Analysis, CheckReport, LayerResult, Violation

TOTAL = "(total)"
"""The module name of a violation of the total parameter limit."""
MODEL = "model"
"""The limit of a module that the model, with the config applied by PEFT, does not give its rank."""


def check_allocation(
    allocation: Allocation,
    max_params: int | None = None,
    max_rank: int | None = None,
    min_energy: float | None = None,
    analysis: Analysis | None = None,
    adapted: dict[str, int] | None = None,
    noise: str = "auto",
) -> CheckReport:
    """Find every violation of the limits given.

    Parameters
    ----------
    allocation : Allocation
    max_params : int, optional
        Total LoRA parameters Σ r·(m+n) allowed.
    max_rank : int, optional
        Largest rank allowed for any module.
    min_energy : float, optional
        Each module's rank must keep at least this share of its update's
        energy, by ``analysis``.
    analysis : Analysis, optional
        Needed for ``min_energy``.
    adapted : dict, optional
        The ranks PEFT built when it applied the config to the model (runtime
        name → rank, see :func:`svdrank.inputs.model.adapted_ranks`): every
        module of the allocation must be among them with its rank.
    noise : {"auto", "off"}
        ``auto``: ``min_energy`` counts the clean update of layers with a
        storage noise floor (see :func:`svdrank.ranks.rules.noise_view`), and a
        rank at or above the signal rank keeps all of it the file resolves.

    Returns
    -------
    CheckReport
        The allocation, the limits and the violations; it passes when there
        are none.

    Raises
    ------
    UsageError
        If no limit is given, ``min_energy`` comes without an analysis, shapes
        are unknown for ``max_params``, or a module is missing from the analysis.
    """
    if max_params is None and max_rank is None and min_energy is None and adapted is None:
        raise UsageError(
            "give at least one limit: --max-params, --max-rank, --min-energy or --model"
        )
    if max_rank is not None and max_rank < 0:
        raise UsageError(f"--max-rank must be ≥ 0, got {max_rank}")
    violations: list[Violation] = []
    if max_params is not None:
        violations += _params_violations(allocation, max_params)
    if max_rank is not None:
        violations += [
            Violation(item.module, "max-rank", item.rank, max_rank)
            for item in allocation.modules
            if item.rank > max_rank
        ]
    if min_energy is not None:
        view = None if analysis is None else noise_view(analysis, noise)
        violations += _energy_violations(allocation, min_energy, view)
    if adapted is not None:
        violations += _model_violations(allocation, adapted)
    limits = {"max_params": max_params, "max_rank": max_rank, "min_energy": min_energy}
    return CheckReport(allocation, limits, tuple(violations))


def _params_violations(allocation: Allocation, max_params: int) -> list[Violation]:
    """Judge the total parameter limit: one violation when the total exceeds it."""
    total = allocation.params
    if total is None:
        raise UsageError(
            f"{allocation.source}: this config has no layer shapes; give --analysis FILE "
            "to count its parameters"
        )
    return [Violation(TOTAL, "max-params", total, max_params)] if total > max_params else []


def _energy_violations(
    allocation: Allocation, min_energy: float, analysis: Analysis | None
) -> list[Violation]:
    """Modules whose rank keeps less than ``min_energy`` of their update."""
    check_target(min_energy)
    if analysis is None:
        raise UsageError("--min-energy needs --analysis FILE (the svdrank diff of the update)")
    violations = []
    for item in allocation.modules:
        layer = _layer_for(item.module, analysis)
        kept = retained_energy(layer.spectrum, item.rank, analysis.settings.metric)
        if layer.spectrum.noise_limited and item.rank >= layer.spectrum.k:
            continue
        if kept < min_energy:
            violations.append(Violation(item.module, "min-energy", kept, min_energy))
    return violations


def _model_violations(allocation: Allocation, adapted: dict[str, int]) -> list[Violation]:
    """Modules of the allocation the model does not adapt, or adapts at another rank (0 = none).

    A name matches the runtime names it equals up to a dotted prefix, so a short
    PEFT target (``q_proj``) is judged at every module it reaches.
    """
    violations = []
    for item in allocation.modules:
        ranks = [rank for name, rank in adapted.items() if same_module(name, item.module)]
        wrong = [rank for rank in ranks if rank != item.rank]
        if not ranks or wrong:
            violations.append(Violation(item.module, MODEL, wrong[0] if wrong else 0, item.rank))
    return violations


def _layer_for(module: str, analysis: Analysis) -> LayerResult:
    """Find the analysis layer of a module, matching names up to a dotted prefix."""
    for layer in analysis.layers:
        if same_module(layer.module, module):
            return layer
    raise UsageError(f"module {module} is not in the analysis; is it the diff of this model?")
