"""What ``extract`` shows: per module its rank, the energy kept, the error, the bytes; totals.

The error is ‖ΔW − s·B·A‖_F / ‖ΔW‖_F of the factors as stored; ``optimal`` is
√(1 − E(r)), the least error any rank-r adapter can have (Eckart-Young): a
module that keeps 90 % of its update's energy has 32 % relative error.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from svdrank.outputs.tables import human_bytes, human_count
from svdrank.types import Extraction

EXTRACTION_SCHEMA = "svdrank.extraction/1"
"""Schema of the JSON record of an extraction."""


def extraction_table(result: Extraction) -> Table:
    """Build the per-module table with a totals row."""
    table = Table(title=f"{result.directory} — {result.rule}, {_dtype(result)}")
    for column in ("module", "type", "shape", "rank", "energy kept", "error", "optimal", "size"):
        table.add_column(column, justify="left" if column in ("module", "type") else "right")
    for layer in result.layers:
        table.add_row(
            layer.target,
            layer.module_type,
            "x".join(map(str, layer.shape)),
            str(layer.rank),
            f"{layer.energy:.1%}",
            f"{layer.error:.2%}",
            f"{layer.optimal:.2%}",
            human_bytes(layer.params * result.itemsize),
        )
    table.add_row(
        f"all ({len(result.layers)} modules)",
        "",
        "",
        str(max((layer.rank for layer in result.layers), default=0)),
        f"{result.energy:.1%}",
        f"{result.worst_error:.2%} worst",
        "",
        f"{human_bytes(result.params * result.itemsize)} of "
        f"{human_bytes(result.full_params * result.itemsize)}",
        style="bold",
    )
    return table


def extraction_summary(result: Extraction) -> str:
    """One line: modules, parameters and bytes against the full update, the worst error."""
    share = result.params / result.full_params if result.full_params else 0.0
    return (
        f"wrote {result.directory} ({len(result.layers)} modules, "
        f"{human_count(result.params)} parameters = {share:.1%} of the full update, "
        f"{human_bytes(result.params * result.itemsize)}; worst relative error "
        f"{result.worst_error:.2%})"
    )


def extraction_record(result: Extraction) -> dict[str, Any]:
    """Return the extraction as a JSON-ready record (``svdrank.extraction/1``)."""
    return {
        "schema": EXTRACTION_SCHEMA,
        "directory": str(result.directory),
        "rule": result.rule,
        "dtype": _dtype(result),
        "modules": [
            {
                "module": layer.module,
                "target": layer.target,
                "type": layer.module_type,
                "shape": list(layer.shape),
                "rank": layer.rank,
                "lora_alpha": layer.alpha,
                "energy": layer.energy,
                "error": layer.error,
                "optimal_error": layer.optimal,
                "method": layer.method,
                "bytes": layer.params * result.itemsize,
            }
            for layer in result.layers
        ],
        "left_out": [{"module": item.module, "reason": item.reason} for item in result.left_out],
        "totals": {
            "params": result.params,
            "full_params": result.full_params,
            "bytes": result.params * result.itemsize,
            "full_bytes": result.full_params * result.itemsize,
            "energy": result.energy,
            "worst_error": result.worst_error,
        },
    }


def _dtype(result: Extraction) -> str:
    """Return the storage dtype of the factors."""
    return result.layers[0].dtype if result.layers else ""
