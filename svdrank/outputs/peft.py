r"""The PEFT config of a plan: which modules and parameters of the model to adapt, at what rank.

When the analysis mapped the checkpoint to the model ``transformers`` builds
(:mod:`svdrank.inputs.model`), every update is targeted by its runtime name:
modules through ``target_modules``, fused 3-D expert tensors through
``target_parameters``. Without a mapping the checkpoint's own names are used,
and the experts of a fused tensor cannot be targeted (PEFT's ``target_modules``
cannot reach one expert of a parameter).

PEFT matches a ``rank_pattern`` key with ``re.match(rf"(.*\.)?({key})$", name)``,
so a full name only matches itself or the same path under a wrapper prefix:
``layers.1.`` can never catch ``layers.11.``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from svdrank.errors import UsageError
from svdrank.inputs.names import is_expert_slice
from svdrank.types import PARAMETER, LayerRank, ModelInfo, RankPlan

DEFAULT_ALPHA_RATIO = 2.0
"""lora_alpha = 2·r, the common convention (scaling α/r = 2)."""
CONV1D = "Conv1D"
"""transformers' GPT-2-style layer that stores its weight as (in, out): PEFT needs
``fan_in_fan_out`` for it."""
SHOWN = 3
"""How many module names an error message lists."""


@dataclass(frozen=True)
class PeftTarget:
    """One name of a PEFT config with its rank and the module class (or ``parameter``)."""

    name: str
    rank: int
    module_type: str


@dataclass(frozen=True)
class PeftTargets:
    """What a plan targets, and the modules with a rank that it cannot target.

    ``untargetable`` are fused expert slices without a runtime mapping;
    ``unmatched`` are modules the runtime model has no counterpart for.
    """

    targets: tuple[PeftTarget, ...]
    untargetable: tuple[str, ...]
    unmatched: tuple[str, ...]


def mapped(model: ModelInfo | None) -> bool:
    """Whether the analysis knows the runtime names (transformers built the model)."""
    return model is not None and model.transformers is not None


def peft_targets(rank_plan: RankPlan, model: ModelInfo | None = None) -> PeftTargets:
    """Group a plan's non-zero ranks by the name PEFT must be given.

    Several layers can land in one runtime name: the experts of a fused
    ``[experts, out, in]`` parameter (PEFT gives each expert the same rank, so
    the parameter takes the largest) and branches transformers fuses at load
    (Mixtral's ``w1`` and ``w3`` become ``gate_up_proj``: an expert's fused
    update has at most the sum of its branches' ranks, so the sum is kept, as
    PEFT's own conversion of such configs does).

    Parameters
    ----------
    rank_plan : RankPlan
    model : ModelInfo, optional
        The analysis's model; with a transformers mapping, layers without a
        target are ``unmatched``.

    Returns
    -------
    PeftTargets
    """
    by_name: dict[str, dict[int | None, int]] = defaultdict(lambda: defaultdict(int))
    types: dict[str, str] = {}
    untargetable: list[str] = []
    unmatched: list[str] = []
    for item in rank_plan.layers:
        if item.rank == 0:
            continue
        name, module_type = _target_name(item, mapped(model))
        if name is None:
            (unmatched if mapped(model) else untargetable).append(item.layer.module)
            continue
        by_name[name][item.layer.expert] += item.rank
        types[name] = module_type
    targets = tuple(
        PeftTarget(name, max(ranks.values()), types[name]) for name, ranks in by_name.items()
    )
    return PeftTargets(targets, tuple(untargetable), tuple(unmatched))


def _target_name(item: LayerRank, runtime: bool) -> tuple[str | None, str]:
    """Return the name PEFT is given for one layer and its module type; None when it has none."""
    layer = item.layer
    if runtime or layer.target is not None:
        return (None, "") if layer.target is None else (layer.target.name, layer.target.module_type)
    if is_expert_slice(layer.module):
        return None, PARAMETER
    return layer.module, ""


def peft_record(
    rank_plan: RankPlan,
    alpha_ratio: float = DEFAULT_ALPHA_RATIO,
    model: ModelInfo | None = None,
    allow_unmatched: bool = False,
) -> dict[str, Any]:
    """Convert a plan to keyword arguments that ``peft.LoraConfig(**record)`` accepts as is.

    ``r`` is the most common rank; the others go to ``rank_pattern`` (and their
    alpha to ``alpha_pattern``) keyed by full name. ``target_parameters`` (PEFT
    ≥ 0.17) appears only when a fused expert parameter is targeted, and
    ``fan_in_fan_out`` only when a ``Conv1D`` module is (PEFT then turns it off
    for the other modules itself).

    Parameters
    ----------
    rank_plan : RankPlan
    alpha_ratio : float
        ``lora_alpha`` of each target as a multiple of its rank.
    model : ModelInfo, optional
        The analysis's model (see :func:`peft_targets`).
    allow_unmatched : bool
        Leave out modules the runtime model has no counterpart for instead of
        refusing.

    Returns
    -------
    dict
        ``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern`` and
        ``alpha_pattern``; ``target_parameters`` and ``fan_in_fan_out`` when needed.

    Raises
    ------
    UsageError
        If every rank is 0 or cannot be targeted, or (without
        ``allow_unmatched``) some module has no counterpart in the model.
    """
    if not (math.isfinite(alpha_ratio) and alpha_ratio > 0):
        raise UsageError(f"--alpha-ratio must be a finite number > 0, got {alpha_ratio}")
    found = peft_targets(rank_plan, model)
    if found.unmatched and not allow_unmatched:
        raise UsageError(_unmatched_message(found.unmatched, model))
    if not found.targets:
        raise UsageError(
            "no layer can be targeted: every rank is 0 (the updates are zero) or belongs to "
            "a module PEFT cannot reach"
        )
    ranks = Counter(target.rank for target in found.targets)
    default = max(sorted(ranks), key=lambda rank: ranks[rank])
    different = [target for target in found.targets if target.rank != default]
    parameters = [target.name for target in found.targets if target.module_type == PARAMETER]
    record: dict[str, Any] = {
        "r": default,
        "lora_alpha": _alpha(default, alpha_ratio),
        "target_modules": [t.name for t in found.targets if t.module_type != PARAMETER],
        "rank_pattern": {target.name: target.rank for target in different},
        "alpha_pattern": {target.name: _alpha(target.rank, alpha_ratio) for target in different},
    }
    if parameters:
        record["target_parameters"] = parameters
    if any(target.module_type == CONV1D for target in found.targets):
        record["fan_in_fan_out"] = True
    return record


def _unmatched_message(unmatched: tuple[str, ...], model: ModelInfo | None) -> str:
    """Word the one-line refusal for modules the runtime model does not have."""
    shown = ", ".join(unmatched[:SHOWN]) + (", …" if len(unmatched) > SHOWN else "")
    where = f"{model.architecture or model.model_type} as transformers builds it" if model else ""
    return (
        f"{len(unmatched)} modules with a rank have no counterpart in {where} ({shown}); "
        "a PEFT config would miss them: pass --allow-unmatched to leave them out"
    )


def _alpha(rank: int, ratio: float) -> float | int:
    """lora_alpha = ratio·rank, as an int when it is whole."""
    alpha = ratio * rank
    return int(alpha) if float(alpha).is_integer() else alpha
