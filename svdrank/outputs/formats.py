"""The machine edge: JSON records (each with a schema version), PEFT configs, CSV, Markdown."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from svdrank.errors import UsageError
from svdrank.files import dumps
from svdrank.inputs.checkpoint import Checkpoint
from svdrank.outputs.peft import DEFAULT_ALPHA_RATIO, peft_record
from svdrank.types import CheckReport, LayerRank, ModelInfo, RankPlan, Violation

INSPECT_SCHEMA = "svdrank.inspect/1"
RANK_FORMATS = ("table", "json", "peft", "csv", "markdown")
"""What ``recommend`` writes: a table on the terminal, or one of the machine formats."""
SUFFIX_FORMATS = {".json": "json", ".csv": "csv", ".md": "markdown"}
"""The format ``recommend -o FILE`` writes when none is asked for, by the file's suffix."""
IMAGE_FORMATS = ("png", "svg", "pdf")
"""The figure file formats."""


def inspect_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """Describe a checkpoint as ``svdrank inspect --format json`` prints it.

    Parameters
    ----------
    checkpoint : Checkpoint

    Returns
    -------
    dict
        Schema ``svdrank.inspect/1``: the path, its files, every tensor (name,
        shape, dtype, bytes, file) and totals overall and per dtype.
    """
    by_dtype: dict[str, dict[str, int]] = {}
    for info in checkpoint.tensors.values():
        totals = by_dtype.setdefault(info.dtype, {"tensors": 0, "parameters": 0, "bytes": 0})
        totals["tensors"] += 1
        totals["parameters"] += info.numel
        totals["bytes"] += info.nbytes
    return {
        "schema": INSPECT_SCHEMA,
        "path": str(checkpoint.path),
        "files": [str(file) for file in checkpoint.files],
        "tensors": [
            {
                "name": info.name,
                "shape": list(info.shape),
                "dtype": info.dtype,
                "bytes": info.nbytes,
                "file": info.file.name,
            }
            for info in checkpoint.tensors.values()
        ],
        "totals": {
            "tensors": len(checkpoint.tensors),
            "bytes": checkpoint.nbytes,
            "by_dtype": by_dtype,
        },
    }


RANKS_SCHEMA = "svdrank.ranks/2"
RANKS_SCHEMAS = ("svdrank.ranks/1", RANKS_SCHEMA)
"""Rank config schemas ``check`` reads (their ``modules`` are alike)."""


RULE_FIELDS = {
    "energy": "energy_target",
    "sv_ratio": "sv_ratio",
    "threshold": "threshold",
    "uniform": "uniform_rank",
    "budget": "budget",
}
"""The field of a rank config that holds each rule's value; the others are null. The
``signal`` rule has no value (each layer's rank is its signal rank)."""


def ranks_record(rank_plan: RankPlan, analysis_path: str | None = None) -> dict[str, Any]:
    """Convert a plan to the native rank config (schema ``svdrank.ranks/2``).

    Every ``energy`` figure, per module and in the totals, is in the plan's
    metric. Only the field of the plan's own rule holds a value: an
    ``sv_ratio`` plan has ``"sv_ratio": 4.0`` and ``"energy_target": null``.
    The ``signal`` rule has no value: every such field is null.
    ``noise_aware`` says whether some rank was read from a clean spectrum
    above the storage noise. Each module records its ``signal_rank`` (null
    without a noise floor) and the ``raw_rank`` the same rule gives on the raw
    spectrum (null where that spectrum cannot answer it, or for rules with no
    raw reading: budgets and ``signal``).

    Parameters
    ----------
    rank_plan : RankPlan
    analysis_path : str, optional
        The analysis file the plan was made from, stored as ``analysis``.

    Returns
    -------
    dict
    """
    rule = rank_plan.rule
    values: dict[str, float | int | None] = dict.fromkeys(RULE_FIELDS.values())
    if rule.method in RULE_FIELDS:
        values[RULE_FIELDS[rule.method]] = (
            int(rule.value) if rule.method in ("budget", "uniform") else rule.value
        )
    return {
        "schema": RANKS_SCHEMA,
        "analysis": analysis_path,
        "rule": rule.method,
        "preset": rule.preset,
        **values,
        "objective": rule.objective,
        "metric": rank_plan.metric,
        "noise_aware": noise_aware([rank_plan]),
        "constraints": asdict(rank_plan.constraints),
        "modules": {
            item.layer.module: {
                "rank": item.rank,
                "raw_rank": item.raw_rank,
                "signal_rank": _signal_rank(item),
                "energy": round(item.energy, 6),
                "params": item.params,
                "shape": list(item.layer.shape),
                "kind": item.layer.kind,
            }
            for item in rank_plan.layers
        },
        "totals": {
            "params": rank_plan.params,
            "full_params": rank_plan.full_params,
            "params_share": (
                rank_plan.params / rank_plan.full_params if rank_plan.full_params else 0.0
            ),
            "energy": round(rank_plan.energy, 6),
        },
    }


def noise_aware(plans: Sequence[RankPlan]) -> bool:
    """Whether any plan read a layer's rank from its clean spectrum above the storage noise."""
    return any(item.layer.spectrum.noise_limited for plan in plans for item in plan.layers)


def _signal_rank(item: LayerRank) -> int | None:
    """Give the layer's signal rank r_s, or None without a noise floor."""
    return None if item.layer.noise is None else item.layer.noise.signal_rank


PLAN_COLUMNS = ("module", "kind", "block", "shape")


def _plan_rows(plans: list[RankPlan]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side layer table of one or more plans.

    Noise-aware plans add, after every plan's columns, the layer's signal rank
    and each plan's raw rank.
    """
    aware = noise_aware(plans)
    header = list(PLAN_COLUMNS)
    for rank_plan in plans:
        header += [f"rank {rank_plan.rule.label}", f"energy {rank_plan.rule.label}"]
    if aware:
        header += ["signal rank", *(f"raw rank {p.rule.label}" for p in plans)]
    rows = []
    for index, first in enumerate(plans[0].layers):
        layer = first.layer
        row = [
            layer.module,
            layer.kind,
            _blank_if_none(layer.block),
            "x".join(map(str, layer.shape)),
        ]
        items = [rank_plan.layers[index] for rank_plan in plans]
        for item in items:
            row += [str(item.rank), f"{item.energy:.4f}"]
        if aware:
            row += [_blank_if_none(_signal_rank(first))]
            row += [_blank_if_none(item.raw_rank) for item in items]
        rows.append(row)
    return header, rows


def _blank_if_none(value: int | None) -> str:
    """Write a whole number as text, or an empty cell for None."""
    return "" if value is None else str(value)


def plans_csv(plans: list[RankPlan]) -> str:
    """One row per layer, rank and retained energy for each plan side by side."""
    header, rows = _plan_rows(plans)
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow([column.replace(" ", "_") for column in header])
    writer.writerows(rows)
    return stream.getvalue()


def plans_markdown(plans: list[RankPlan]) -> str:
    """Render the plans as a GitHub Markdown table, with a totals row."""
    header, rows = _plan_rows(plans)
    totals = ["**total**", "", "", ""]
    for rank_plan in plans:
        totals += [f"{rank_plan.params:,} params", f"{rank_plan.energy:.4f}"]
    totals += [""] * (len(header) - len(totals))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in [*rows, totals]]
    return "\n".join(lines) + "\n"


CHECK_SCHEMA = "svdrank.check/1"


def report_record(report: CheckReport) -> dict[str, Any]:
    """Convert a check report to JSON (schema ``svdrank.check/1``)."""
    allocation = report.allocation
    return {
        "schema": CHECK_SCHEMA,
        "target": allocation.source,
        "format": allocation.source_format,
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
    """Render a check report for a CI log: a verdict, then one line per violation."""
    allocation = report.allocation
    params = "unknown" if allocation.params is None else f"{allocation.params:,}"
    count = len(report.violations)
    verdict = "PASS" if report.passed else f"FAIL ({count} violation{'s' * (count != 1)})"
    lines = [
        f"svdrank check: {verdict}: {allocation.source} ({allocation.source_format}), "
        f"{len(allocation.modules)} modules, {params} LoRA parameters, "
        f"max rank {allocation.max_rank}"
    ]
    lines += [
        f"  {violation.limit}: {violation.module}: {_judged(violation)}"
        for violation in report.violations
    ]
    return "\n".join(lines) + "\n"


def _judged(violation: Violation) -> str:
    """Say how one violation breaks its limit."""
    value, bound = _format_limit(violation)
    if violation.limit == "min-energy":
        return f"keeps {value} < {bound}"
    if violation.limit == "model":
        got = "not adapted" if violation.value == 0 else f"adapted at rank {value}"
        return f"{got} in the model, config says rank {bound}"
    return f"{value} > {bound}"


def _format_limit(violation: Violation) -> tuple[str, str]:
    """Value and bound as text: counts with separators, energies as percentages."""
    if violation.limit == "min-energy":
        return f"{violation.value:.2%}", f"{violation.bound:.2%}"
    return f"{int(violation.value):,}", f"{int(violation.bound):,}"


def rank_format(requested: str | None, output: Path | None, piped: bool) -> str:
    """Pick the format asked for, else by -o's suffix, else json when piped and table on a terminal.

    Raises
    ------
    UsageError
        For ``table`` with an output file.
    """
    if requested is not None:
        if requested == "table" and output is not None:
            raise UsageError(
                "--format table prints to the terminal; choose json, peft, csv or markdown with -o"
            )
        return requested
    if output is not None:
        return SUFFIX_FORMATS.get(output.suffix.lower(), "json")
    return "json" if piped else "table"


def config_text(
    rank_plan: RankPlan,
    rank_format: str,
    alpha_ratio: float | None,
    source: str | None,
    model: ModelInfo | None = None,
    allow_unmatched: bool = False,
) -> str:
    """Render one plan as a native (``json``) or PEFT (``peft``) config, strict JSON.

    ``model`` and ``allow_unmatched`` apply to PEFT configs (see
    :func:`svdrank.outputs.peft.peft_record`).
    """
    if rank_format == "peft":
        ratio = DEFAULT_ALPHA_RATIO if alpha_ratio is None else alpha_ratio
        return dumps(peft_record(rank_plan, ratio, model, allow_unmatched))
    return dumps(ranks_record(rank_plan, source))


def plans_table_text(plans: list[RankPlan], rank_format: str) -> str:
    """Render plans side by side as ``csv`` or ``markdown``."""
    return plans_csv(plans) if rank_format == "csv" else plans_markdown(plans)
