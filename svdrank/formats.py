"""The JSON edge: records written for machines and read back, each with a schema version."""

from __future__ import annotations

import json
from typing import Any

from svdrank.checkpoint import Checkpoint

INSPECT_SCHEMA = "svdrank.inspect/1"


def inspect_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """What ``svdrank inspect --format json`` prints: files, tensors and totals per dtype."""
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


def dumps(record: dict[str, Any]) -> str:
    """Serialise a record as indented JSON with a trailing newline."""
    return json.dumps(record, indent=2) + "\n"
