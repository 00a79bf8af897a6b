"""The CI gate: does a rank config or a trained adapter stay within its limits?

A target is read into an Allocation (module → rank, and shape when known):
a native rank config (``svdrank.ranks/1``), a PEFT config (the kwargs of
``LoraConfig``, e.g. from ``recommend --format peft``, or an
``adapter_config.json``), or a PEFT adapter directory, whose
``adapter_model.safetensors`` gives the real ranks and shapes from its header.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svdrank.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_directory,
    is_adapter,
    lora_modules,
    pattern_key,
)
from svdrank.analysis import Analysis, LayerResult
from svdrank.checkpoint import open_checkpoint
from svdrank.energy import check_target, retained_energy
from svdrank.errors import AnalysisFileError, UsageError
from svdrank.formats import RANKS_SCHEMA

CHECK_SCHEMA = "svdrank.check/1"
TOTAL = "(total)"


@dataclass(frozen=True)
class ModuleRank:
    """One module's LoRA rank, and its (out, in) shape when the target tells it."""

    module: str
    rank: int
    shape: tuple[int, int] | None

    @property
    def params(self) -> int | None:
        """r·(m+n), or None without a shape."""
        return None if self.shape is None else self.rank * sum(self.shape)


@dataclass(frozen=True)
class Allocation:
    """The ranks a target gives, and what kind of target it was."""

    source: str
    kind: str
    modules: tuple[ModuleRank, ...]

    @property
    def params(self) -> int | None:
        """Total LoRA parameters, or None when a shape is unknown."""
        counts = [item.params for item in self.modules]
        return None if None in counts else sum(counts)

    @property
    def max_rank(self) -> int:
        """The largest rank of any module."""
        return max((item.rank for item in self.modules), default=0)


@dataclass(frozen=True)
class Violation:
    """One broken limit: which module (or the total), which limit, the value and the bound."""

    module: str
    limit: str
    value: float
    bound: float


@dataclass(frozen=True)
class CheckReport:
    """The outcome of a check."""

    allocation: Allocation
    limits: dict[str, float | None]
    violations: tuple[Violation, ...]

    @property
    def passed(self) -> bool:
        """Whether every limit holds."""
        return not self.violations


def read_allocation(path: str | Path, analysis: Analysis | None = None) -> Allocation:
    """Read a rank config, PEFT config or adapter into an Allocation.

    ``analysis`` supplies shapes (and expands short PEFT target names such as
    ``q_proj``) where the target itself has none.

    Raises
    ------
    AnalysisFileError
        If the file is missing, not JSON, or neither kind of config.
    """
    path = Path(path)
    if is_adapter(path) and (adapter_directory(path) / WEIGHTS_NAME).is_file():
        return _adapter_allocation(adapter_directory(path))
    record = _read_json(path)
    if record.get("schema") == RANKS_SCHEMA:
        return _native_allocation(path, record)
    if "r" in record and "target_modules" in record:
        return _peft_allocation(path, record, analysis)
    raise AnalysisFileError(
        f"{path}: neither a svdrank rank config ({RANKS_SCHEMA}) nor a PEFT LoRA config "
        "(with 'r' and 'target_modules')"
    )


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or a one-line error."""
    if path.is_dir():
        raise AnalysisFileError(f"{path}: a directory without {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnalysisFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnalysisFileError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(record, dict):
        raise AnalysisFileError(f"{path}: not a JSON object")
    return record


def _native_allocation(path: Path, record: dict[str, Any]) -> Allocation:
    """Modules, ranks and shapes of a svdrank.ranks/1 file."""
    try:
        modules = tuple(
            ModuleRank(name, int(item["rank"]), (int(item["shape"][0]), int(item["shape"][1])))
            for name, item in record["modules"].items()
            if int(item["rank"]) > 0
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise AnalysisFileError(f"{path}: corrupt rank config (bad or missing {exc})") from exc
    return Allocation(str(path), "ranks", modules)


def _peft_allocation(path: Path, record: dict[str, Any], analysis: Analysis | None) -> Allocation:
    """Modules and ranks of a PEFT config; shapes from the analysis when given."""
    try:
        default = int(record["r"])
        patterns = {
            str(key): int(value) for key, value in (record.get("rank_pattern") or {}).items()
        }
        targets = record["target_modules"]
    except (TypeError, ValueError) as exc:
        raise AnalysisFileError(f"{path}: corrupt PEFT config ({exc})") from exc
    layers = {layer.module: layer for layer in analysis.layers} if analysis else {}
    names = _targeted(targets, list(layers)) if layers else _literal_targets(path, targets)
    modules = []
    for name in names:
        key = pattern_key(patterns, name)
        layer = layers.get(name)
        rank = patterns[key] if key is not None else default
        modules.append(ModuleRank(name, rank, layer.shape if layer else None))
    return Allocation(str(path), "peft-config", tuple(modules))


def _targeted(targets: str | list[str], modules: list[str]) -> list[str]:
    """The modules PEFT would adapt: a regex matched whole, or names matched as suffixes."""
    if isinstance(targets, str):
        return [name for name in modules if re.fullmatch(targets, name)]
    return [
        name
        for name in modules
        if any(name == target or name.endswith("." + target) for target in targets)
    ]


def _literal_targets(path: Path, targets: Any) -> list[str]:
    """Without an analysis, the target list itself names the modules."""
    if not isinstance(targets, list):
        raise UsageError(f"{path}: target_modules is a pattern; give --analysis to expand it")
    return [str(target) for target in targets]


def _adapter_allocation(directory: Path) -> Allocation:
    """Real ranks and shapes of a trained adapter, from its weights' header alone."""
    weights = open_checkpoint(directory / WEIGHTS_NAME)
    modules = []
    for lora in lora_modules(weights):
        a, b = weights.tensors[lora.a].shape, weights.tensors[lora.b].shape
        rank, shape = (a[0], (b[0], a[1])) if not lora.embedding else (b[1], (a[1], b[0]))
        modules.append(ModuleRank(lora.module, int(rank), (int(shape[0]), int(shape[1]))))
    return Allocation(str(directory), "adapter", tuple(modules))


def check_allocation(
    allocation: Allocation,
    max_params: int | None = None,
    max_rank: int | None = None,
    min_energy: float | None = None,
    analysis: Analysis | None = None,
) -> CheckReport:
    """Every violation of the limits given.

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

    Raises
    ------
    UsageError
        If no limit is given, ``min_energy`` comes without an analysis, shapes
        are unknown for ``max_params``, or a module is missing from the analysis.
    """
    if max_params is None and max_rank is None and min_energy is None:
        raise UsageError("give at least one limit: --max-params, --max-rank or --min-energy")
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
        violations += _energy_violations(allocation, min_energy, analysis)
    limits = {"max_params": max_params, "max_rank": max_rank, "min_energy": min_energy}
    return CheckReport(allocation, limits, tuple(violations))


def _params_violations(allocation: Allocation, max_params: int) -> list[Violation]:
    """The total parameter limit."""
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
        if kept < min_energy:
            violations.append(Violation(item.module, "min-energy", kept, min_energy))
    return violations


def _layer_for(module: str, analysis: Analysis) -> LayerResult:
    """The analysis layer of a module, matching names up to a dotted prefix."""
    for layer in analysis.layers:
        if (
            layer.module == module
            or layer.module.endswith("." + module)
            or module.endswith("." + layer.module)
        ):
            return layer
    raise UsageError(f"module {module} is not in the analysis; is it the diff of this model?")


def report_record(report: CheckReport) -> dict[str, Any]:
    """A check report as JSON (schema ``svdrank.check/1``)."""
    allocation = report.allocation
    return {
        "schema": CHECK_SCHEMA,
        "target": allocation.source,
        "kind": allocation.kind,
        "passed": report.passed,
        "limits": report.limits,
        "totals": {
            "modules": len(allocation.modules),
            "params": allocation.params,
            "max_rank": allocation.max_rank,
        },
        "violations": [
            {"module": v.module, "limit": v.limit, "value": v.value, "bound": v.bound}
            for v in report.violations
        ],
    }


def report_text(report: CheckReport) -> str:
    """A check report as lines for a CI log: a verdict, then one line per violation."""
    allocation = report.allocation
    params = "unknown" if allocation.params is None else f"{allocation.params:,}"
    count = len(report.violations)
    verdict = "PASS" if report.passed else f"FAIL ({count} violation{'s' * (count != 1)})"
    lines = [
        f"svdrank check: {verdict}: {allocation.source} ({allocation.kind}), "
        f"{len(allocation.modules)} modules, {params} LoRA parameters, "
        f"max rank {allocation.max_rank}"
    ]
    for violation in report.violations:
        value, bound = _format_limit(violation)
        lines.append(
            f"  {violation.limit}: {violation.module}: {value} > {bound}"
            if violation.limit != "min-energy"
            else f"  {violation.limit}: {violation.module}: keeps {value} < {bound}"
        )
    return "\n".join(lines) + "\n"


def _format_limit(violation: Violation) -> tuple[str, str]:
    """Value and bound as text: counts with separators, energies as percentages."""
    if violation.limit == "min-energy":
        return f"{violation.value:.2%}", f"{violation.bound:.2%}"
    return f"{int(violation.value):,}", f"{int(violation.bound):,}"
