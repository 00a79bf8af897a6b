"""Rich tables and summaries for humans; machine output lives in formats.py."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from svdrank.checkpoint import Checkpoint
from svdrank.pairing import kind_of, module_of


def human_bytes(count: float) -> str:
    """Bytes as a short human string (``1.5 MB``), decimal units."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def human_count(count: float) -> str:
    """A parameter count as a short string (``4.2M``)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:.0f}"


def inspect_tables(checkpoint: Checkpoint) -> list[Table]:
    """The tensor table of a checkpoint and its totals per dtype and per kind."""
    tensors = Table(title=f"{checkpoint.path} — {len(checkpoint.tensors)} tensors")
    for column in ("name", "shape", "dtype", "size"):
        tensors.add_column(column, justify="right" if column == "size" else "left")
    for info in checkpoint.tensors.values():
        tensors.add_row(
            info.name, "x".join(map(str, info.shape)), info.dtype, human_bytes(info.nbytes)
        )
    return [
        tensors,
        _totals_table("per dtype", checkpoint, lambda info: info.dtype),
        _totals_table("per kind", checkpoint, lambda info: kind_of(module_of(info.name))),
    ]


def _totals_table(title: str, checkpoint: Checkpoint, key) -> Table:
    """Tensor count, parameters and bytes grouped by ``key(info)``."""
    counts, params, sizes = Counter(), Counter(), Counter()
    for info in checkpoint.tensors.values():
        counts[key(info)] += 1
        params[key(info)] += info.numel
        sizes[key(info)] += info.nbytes
    table = Table(title=f"Totals {title}")
    table.add_column(title.split()[-1])
    for column in ("tensors", "parameters", "size"):
        table.add_column(column, justify="right")
    for group in sorted(counts):
        table.add_row(
            group, str(counts[group]), human_count(params[group]), human_bytes(sizes[group])
        )
    table.add_row(
        "all",
        str(sum(counts.values())),
        human_count(sum(params.values())),
        human_bytes(sum(sizes.values())),
        style="bold",
    )
    return table


def print_tables(console: Console, tables: list[Table]) -> None:
    """Print tables one after another."""
    for table in tables:
        console.print(table)
