"""Time `svdrank plot` on a 32-block x 7-kind analysis (issue: under 5 s)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import (
    REPEATS,
    machine,
    markdown_table,
    median_seconds,
    write_decaying_pair,
    write_results,
)
from svdrank.analysis.pipeline import analyze
from svdrank.outputs.plots import plot_analysis

BLOCKS = 32
HIDDEN, MLP = 128, 352
SHAPES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}


def write_pair(directory: Path) -> tuple[Path, Path]:
    """A 32-block BF16 pair whose updates decay at a different rate in every layer."""
    rng = np.random.default_rng(32)
    shapes = {
        f"model.layers.{block}.{suffix}.weight": shape
        for block in range(BLOCKS)
        for suffix, shape in SHAPES.items()
    }
    alphas = {name: rng.uniform(0.3, 2.0) for name in shapes}
    return write_decaying_pair(directory, shapes, alphas, relative_change=0.2, seed=32)


def main() -> None:
    """Time plotting in each format; write results/plots.{json,md}."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="svdrank-plots-") as scratch:
        analysis = analyze(*write_pair(Path(scratch)))
        for image_format in ("png", "svg", "pdf"):
            seconds, paths = median_seconds(
                lambda f=image_format: plot_analysis(analysis, Path(scratch) / f, f), REPEATS
            )
            rows.append({"format": image_format, "seconds": seconds, "figures": len(paths)})
    record = {"machine": machine(), "blocks": BLOCKS, "repeats": REPEATS, "rows": rows}
    write_results("plots", record, markdown)


def markdown(record: dict) -> str:
    """The summary table, from the saved record."""
    env, blocks = record["machine"], record["blocks"]
    text = f"# `svdrank plot` on {blocks} blocks x 7 kinds ({blocks * 7} layers)\n\n"
    text += f"Machine: {env['cores']} cores; medians of {record['repeats']}; all figures of the "
    text += (
        "three presets (energy curves, singular-value decay, three heat maps, budget chart).\n\n"
    )
    return text + markdown_table(
        ["format", "figures", "seconds"],
        [[row["format"], row["figures"], f"{row['seconds']:.2f}"] for row in record["rows"]],
    )


if __name__ == "__main__":
    main()
