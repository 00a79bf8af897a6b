"""Rich tables and summaries for humans; machine output lives in formats.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table

from svdrank.inputs.checkpoint import Checkpoint
from svdrank.inputs.names import kinds_in_order, module_of, name_modules, short_kinds
from svdrank.outputs.noise_columns import add_noise_columns, flag_caption, has_noise, noise_cells
from svdrank.types import (
    SKIP_REASONS,
    Analysis,
    LayerRank,
    PlanSet,
    Progress,
    ProgressUpdate,
    RankPlan,
    TensorInfo,
)


def human_bytes(count: float) -> str:
    """Bytes as a short human string (``1.5 MB``), decimal units."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def human_count(count: float) -> str:
    """Format a parameter count as a short string (``4.20M``)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:.0f}"


def inspect_tables(checkpoint: Checkpoint) -> list[Table]:
    """Build the tensor table of a checkpoint and its totals per dtype and per kind."""
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
        _totals_table("per kind", checkpoint, _kind_labels(checkpoint).__getitem__),
    ]


def _kind_labels(checkpoint: Checkpoint) -> dict[TensorInfo, str]:
    """Label every tensor with its kind's shortest unambiguous suffix."""
    names = name_modules([module_of(name) for name in checkpoint.tensors])
    short = short_kinds(name.kind for name in names.values())
    return {info: short[names[module_of(info.name)].kind] for info in checkpoint.tensors.values()}


def _totals_table(title: str, checkpoint: Checkpoint, key: Callable[[TensorInfo], str]) -> Table:
    """Tensor count, parameters and bytes grouped by ``key(info)``."""
    counts: Counter[str] = Counter()
    params: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
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


def diff_tables(analysis: Analysis, plans: PlanSet) -> list[Table]:
    """Build the per-layer table, the per-kind summary and the skipped tensors of an analysis."""
    tables = [_layer_table(analysis, plans), _kind_table(list(plans.chosen))]
    if analysis.skipped:
        tables.append(_skipped_table(analysis))
    return tables


def _layer_table(analysis: Analysis, plans: PlanSet) -> Table:
    """One row per layer: norms, the ranks of each plan, energy kept at uniform ranks, engine.

    With storage noise, the signal rank, τ, the energy below τ and the flags
    follow, and a caption counts the flagged layers.
    """
    noisy = has_noise(analysis.layers)
    table = Table(
        title=f"{len(analysis.layers)} layers",
        title_justify="left",
        caption=flag_caption(analysis.layers),
        caption_justify="left",
    )
    table.add_column("module")
    table.add_column("shape")
    for column in ("‖ΔW‖", "‖ΔW‖/‖W‖"):
        table.add_column(column, justify="right")
    for rank_plan in plans.chosen:
        table.add_column(_rank_heading(rank_plan), justify="right")
    for rank_plan in plans.uniform:
        table.add_column(f"E(r={rank_plan.rule.value:.0f})", justify="right")
    table.add_column("engine")
    if noisy:
        add_noise_columns(table)
    for index, layer in enumerate(analysis.layers):
        spectrum = layer.spectrum
        ranks = [str(rank_plan.layers[index].rank) for rank_plan in plans.chosen]
        kept = [_energy_text(rank_plan.layers[index]) for rank_plan in plans.uniform]
        table.add_row(
            layer.module,
            "x".join(map(str, layer.shape)),
            f"{layer.delta_norm:.4g}",
            "-" if layer.relative_change is None else f"{layer.relative_change:.3f}",
            *ranks,
            *kept,
            spectrum.engine + ("" if spectrum.complete else f" k={spectrum.k}"),
            *(noise_cells(layer) if noisy else []),
        )
    return table


def _rank_heading(rank_plan: RankPlan) -> str:
    """Head a column of ranks: ``r@90%`` for an energy rule, else the rule's label."""
    rule = rank_plan.rule
    return f"r@{rule.value:.0%}" if rule.method == "energy" else f"r {rule.label}"


def _plan_heading(rank_plan: RankPlan) -> str:
    """Head a plan's column: its label, with the target of an energy rule."""
    rule = rank_plan.rule
    return f"{rule.label} ({rule.value:.0%})" if rule.method == "energy" else rule.label


def _energy_text(item: LayerRank) -> str:
    """E(rank) as a percentage; '≥' marks a lower bound beyond a truncated spectrum."""
    spectrum = item.layer.spectrum
    bound = "≥" if not spectrum.complete and item.rank > spectrum.k else ""
    return f"{bound}{item.energy:.1%}"


def _kind_table(plans: list[RankPlan]) -> Table:
    """Tabulate LoRA parameters per stack and kind and per preset, against full fine-tuning.

    Kinds are shown by their shortest unambiguous suffix; experts of one kind
    are summed in one row (the ``layers`` column counts them).
    """
    table = Table(title="LoRA parameters per kind", title_justify="left")
    table.add_column("kind")
    table.add_column("layers", justify="right")
    table.add_column("full FT", justify="right")
    for rank_plan in plans:
        table.add_column(_plan_heading(rank_plan), justify="right")
    groups: dict[tuple[str, str], list[int]] = {}
    for position, item in enumerate(plans[0].layers):
        groups.setdefault((item.layer.stack, item.layer.kind), []).append(position)
    short = short_kinds(kind for _, kind in groups)
    labels = {key: f"{key[0]}: {short[key[1]]}" if key[0] else short[key[1]] for key in groups}
    order = kinds_in_order(labels.values())
    for key, positions in sorted(groups.items(), key=lambda item: order.index(labels[item[0]])):
        full = sum(plans[0].layers[i].layer.full_params for i in positions)
        cells = [_params_text(sum(p.layers[i].params for i in positions), full) for p in plans]
        table.add_row(labels[key], str(len(positions)), human_count(full), *cells)
    full = plans[0].full_params
    totals = [_params_text(p.params, full) + f", keeps {p.energy:.1%}" for p in plans]
    table.add_row("all", str(len(plans[0].layers)), human_count(full), *totals, style="bold")
    return table


def _params_text(params: int, full: int) -> str:
    """Parameters with their share of full fine-tuning."""
    return f"{human_count(params)} ({params / full:.1%})" if full else human_count(params)


LISTED_IN_FULL = ("shape-mismatch", "only-in-base", "only-in-tuned")
EXAMPLES = 3


def _skipped_table(analysis: Analysis) -> Table:
    """Skipped tensors grouped by reason; the reasons that signal a problem list every name."""
    table = Table(title=f"{len(analysis.skipped)} tensors skipped", title_justify="left")
    table.add_column("reason")
    table.add_column("count", justify="right")
    table.add_column("tensors")
    groups: dict[str, list] = {}
    for item in analysis.skipped:
        groups.setdefault(item.reason, []).append(item)
    for reason, items in groups.items():
        if reason in LISTED_IN_FULL:
            names = "\n".join(
                f"{item.name} ({item.detail})" if item.detail else item.name for item in items
            )
        else:
            names = ", ".join(item.name for item in items[:EXAMPLES])
            names += f", … {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else ""
        table.add_row(SKIP_REASONS[reason], str(len(items)), names)
    return table


def plans_table(plans: list[RankPlan], analysis: Analysis | None = None) -> Table:
    """Tabulate ranks and retained energy per layer for one or more plans side by side.

    Parameters
    ----------
    plans : list of RankPlan
        Made from the same analysis, so their layers line up.
    analysis : Analysis, optional
        The analysis the plans were made from. When some of its layers have
        storage noise, their signal rank, τ, energy below τ and flags follow
        (read from the raw spectra, which a noise-aware plan no longer holds),
        and a caption counts the flagged layers.

    Returns
    -------
    Table
        One row per layer and a totals row.
    """
    stored = {layer.module: layer for layer in analysis.layers} if analysis is not None else {}
    raw = [stored[item.layer.module] for item in plans[0].layers] if stored else []
    noisy = has_noise(raw)
    table = Table(
        title="Recommended LoRA ranks",
        title_justify="left",
        caption=flag_caption(raw),
        caption_justify="left",
    )
    table.add_column("module")
    table.add_column("shape")
    for rank_plan in plans:
        table.add_column(f"r {rank_plan.rule.label}", justify="right")
        table.add_column("kept", justify="right")
    if noisy:
        add_noise_columns(table)
    for index, first in enumerate(plans[0].layers):
        cells = []
        for rank_plan in plans:
            item = rank_plan.layers[index]
            cells += [str(item.rank), f"{item.energy:.1%}"]
        if noisy:
            cells += noise_cells(raw[index])
        table.add_row(first.layer.module, "x".join(map(str, first.layer.shape)), *cells)
    totals = []
    for rank_plan in plans:
        totals += [
            _params_text(rank_plan.params, rank_plan.full_params) + " params",
            f"{rank_plan.energy:.1%}",
        ]
    table.add_row("total", "", *totals, style="bold")
    return table


@contextmanager
def layer_progress(console: Console, enabled: bool) -> Iterator[Progress | None]:
    """Show a progress bar on ``console`` (stderr): layers, MB read, elapsed, ETA.

    Parameters
    ----------
    console : Console
    enabled : bool
        False yields None and draws nothing.

    Yields
    ------
    callable or None
        The callback to pass as the pipeline's ``progress``; the bar is removed
        when the block ends.
    """
    if not enabled:
        yield None
        return
    columns = (
        TextColumn("{task.description}", style="cyan"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("layers · {task.fields[read]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with RichProgress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("decomposing", total=None, read="")

        def advance(update: ProgressUpdate) -> None:
            read = f"{update.bytes_done / 1e6:,.0f}/{update.bytes_total / 1e6:,.0f} MB"
            bar.update(
                task,
                completed=update.layers_done,
                total=update.layers_total,
                read=read,
                description=update.layer.module,
            )

        yield advance
