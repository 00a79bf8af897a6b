"""The storage-noise columns of the per-layer tables: r_s, τ, the energy below τ, the flags.

The columns appear only when some layer has a noise floor (BF16, F16 or F8
inputs); F32 checkpoints and adapters keep their tables as they were. Every
cell reads the layer as the analysis holds it, with its raw spectrum.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rich.table import Table

from svdrank.spectra.signal import below_threshold_share, noise_flags
from svdrank.types import LayerResult

SEE_ALSO = "see README 'Storage noise'"
"""Where the caption of a table with flagged layers sends the reader."""


def has_noise(layers: Sequence[LayerResult]) -> bool:
    """Whether any layer has a storage noise floor (then the tables show its columns)."""
    return any(layer.noise is not None for layer in layers)


def add_noise_columns(table: Table) -> None:
    """Add the r_s, τ, noise and flags columns to a per-layer table."""
    for column in ("r_s", "τ", "noise"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("flags")


def noise_cells(layer: LayerResult) -> list[str]:
    """Format one layer's noise cells: r_s, τ, its share of ‖ΔW‖_F² below τ, and its flags.

    Parameters
    ----------
    layer : LayerResult
        As the analysis holds it: the share is read from its raw spectrum.

    Returns
    -------
    list of str
        r_s with ``+`` when it is a lower bound (a truncated spectrum stopped
        above τ), τ to 3 significant digits, the share as a percentage and the
        flags joined by commas; dashes and no flags for a layer without a floor.
    """
    noise = layer.noise
    share = below_threshold_share(layer)
    if noise is None or share is None:
        return ["-", "-", "-", ""]
    return [
        f"{noise.signal_rank}{'' if noise.signal_rank_exact else '+'}",
        f"{noise.threshold:.3g}",
        f"{share:.1%}",
        ", ".join(noise_flags(layer)),
    ]


def flag_caption(layers: Sequence[LayerResult]) -> str | None:
    """Count the flagged layers under each flag for a table's caption; None when none is.

    The flags in alphabetical order, as in ``3 layers noisy, 1 unresolved: see
    README 'Storage noise'``.
    """
    counts = Counter(flag for layer in layers for flag in noise_flags(layer))
    if not counts:
        return None
    first, *others = sorted(counts)
    parts = [f"{counts[first]} layer{'s' * (counts[first] != 1)} {first}"]
    parts += [f"{counts[flag]} {flag}" for flag in others]
    return f"{', '.join(parts)}: {SEE_ALSO}"
