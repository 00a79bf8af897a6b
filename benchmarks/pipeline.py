"""`svdrank diff` end to end against the compute floor, on a generated Llama-shaped pair.

The pair has TinyLlama's block shapes (hidden 2048, MLP 5632, grouped-query
k/v of 256x2048), 4 blocks, BF16, and no embeddings (so the largest layer is
an MLP matrix, which makes the memory bound strict). ΔW = G·diag(i^-α) for a
Gaussian G, so σᵢ decays roughly like i^-α; three regimes:

- ``slow``: α = 0.5 in every layer, as in full fine-tunes (long-tailed
  spectra: 95 % energy needs most of the rank), the worst case;
- ``mixed``: attention α = 1.0, MLP α = 0.5;
- ``fast``: α = 1.0 everywhere (light fine-tunes, merged adapters).

Measured in the same run, page cache warm: (a) the wall time of the
``svdrank diff`` command, and (b) the floor: reading both files, forming
every ΔW and one ΔWᵀΔW product (SYRK) per layer. Also the peak RSS of the
diff process against 3x the largest layer in float32 + 200 MB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.linalg

from benchmarks.common import (
    machine,
    markdown_table,
    median_seconds,
    write_decaying_pair,
    write_results,
)
from svdrank.checkpoint import open_checkpoint, read_tensor_view
from svdrank.pairing import pair_checkpoints

REPEATS = 3
BLOCKS = 4
HIDDEN, MLP, KV = 2048, 5632, 256
REGIMES = {
    "slow": {"attention": 0.5, "mlp": 0.5},
    "mixed": {"attention": 1.0, "mlp": 0.5},
    "fast": {"attention": 1.0, "mlp": 1.0},
}


def layer_shapes() -> dict[str, tuple[int, int]]:
    """Every weight matrix of the model with its (out, in) shape."""
    shapes = {}
    for block in range(BLOCKS):
        attn, mlp = f"model.layers.{block}.self_attn", f"model.layers.{block}.mlp"
        shapes |= {
            f"{attn}.q_proj.weight": (HIDDEN, HIDDEN),
            f"{attn}.k_proj.weight": (KV, HIDDEN),
            f"{attn}.v_proj.weight": (KV, HIDDEN),
            f"{attn}.o_proj.weight": (HIDDEN, HIDDEN),
            f"{mlp}.gate_proj.weight": (MLP, HIDDEN),
            f"{mlp}.up_proj.weight": (MLP, HIDDEN),
            f"{mlp}.down_proj.weight": (HIDDEN, MLP),
        }
    return shapes


def write_pair(directory: Path, regime: dict[str, float], seed: int) -> tuple[Path, Path]:
    """Write the BF16 pair of one regime."""
    shapes = layer_shapes()
    alphas = {name: regime["mlp" if ".mlp." in name else "attention"] for name in shapes}
    return write_decaying_pair(directory, shapes, alphas, relative_change=0.1, seed=seed)


def floor(base: Path, tuned: Path) -> None:
    """Read both files, form every ΔW (float32) and one Gram product per layer."""
    pairing = pair_checkpoints(open_checkpoint(base), open_checkpoint(tuned))
    for layer in pairing.layers:
        delta = np.subtract(
            read_tensor_view(layer.tuned), read_tensor_view(layer.base), dtype=np.float32
        )
        m, n = delta.shape
        scipy.linalg.blas.ssyrk(1.0, delta.T, trans=0 if m >= n else 1, lower=1)


def run_diff(base: Path, tuned: Path, output: Path) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one `svdrank diff` process."""
    command = [
        sys.executable,
        "-m",
        "svdrank",
        "diff",
        str(base),
        str(tuned),
        "-o",
        str(output),
        "--format",
        "json",
        "--quiet",
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"svdrank diff failed: {command}")
    return seconds, usage.ru_maxrss * 1024


def warm_page_cache(*files: Path) -> None:
    """Read the files once so that every measurement sees them cached."""
    for file in files:
        with open(file, "rb") as stream:
            while stream.read(1 << 24):
                pass


def engine_breakdown(analysis: Path) -> dict[str, dict[str, float]]:
    """Layers and decomposition seconds per engine, from the analysis file."""
    totals: dict[str, dict[str, float]] = {}
    for layer in json.loads(analysis.read_text())["layers"]:
        entry = totals.setdefault(layer["engine"], {"layers": 0, "seconds": 0.0})
        entry["layers"] += 1
        entry["seconds"] += layer["seconds"]
    return totals


def run_regime(name: str, regime: dict[str, float], scratch: Path) -> dict:
    """Measure one regime: floor, diff wall time, RSS, where the time went."""
    directory = scratch / name
    directory.mkdir()
    base, tuned = write_pair(directory, regime, seed=len(name))
    warm_page_cache(base, tuned)
    floor_time, _ = median_seconds(lambda: floor(base, tuned), REPEATS)
    output = directory / "analysis.json"
    runs = [run_diff(base, tuned, output) for _ in range(REPEATS)]
    diff = sorted(seconds for seconds, _ in runs)[REPEATS // 2]
    peak = max(rss for _, rss in runs)
    largest = max(m * n * 4 for m, n in layer_shapes().values())
    result = {
        "regime": name,
        "alpha": regime,
        "bytes_per_checkpoint": base.stat().st_size,
        "floor_seconds": floor_time,
        "diff_seconds": diff,
        "ratio": diff / floor_time,
        "peak_rss_bytes": peak,
        "rss_limit_bytes": 3 * largest + 200_000_000,
        "largest_layer_float32_bytes": largest,
        "engines": engine_breakdown(output),
    }
    shutil.rmtree(directory)
    return result


def markdown(record: dict) -> str:
    """The README-linked summary table, from the saved record."""
    rows, env = record["regimes"], record["machine"]
    table = []
    for row in rows:
        engines = ", ".join(
            f"{engine} {entry['layers']} layers {entry['seconds']:.2f} s"
            for engine, entry in sorted(row["engines"].items())
        )
        table.append(
            [
                row["regime"],
                f"{row['floor_seconds']:.2f} s",
                f"{row['diff_seconds']:.2f} s",
                f"{row['ratio']:.2f}",
                f"{row['peak_rss_bytes'] / 1e6:.0f} MB",
                f"{row['rss_limit_bytes'] / 1e6:.0f} MB",
                engines,
            ]
        )
    text = "# `svdrank diff` against the compute floor\n\n"
    text += f"Machine: {env['cores']} cores; numpy {env['numpy']}, scipy {env['scipy']}. "
    text += f"{BLOCKS} TinyLlama-shaped blocks, BF16, "
    text += f"{rows[0]['bytes_per_checkpoint'] / 1e6:.0f} MB per checkpoint; "
    text += f"medians of {record['repeats']}; "
    text += "floor = read both files + form every ΔW + one ΔWᵀΔW per layer, same run.\n\n"
    text += markdown_table(
        [
            "regime",
            "(b) floor",
            "(a) diff",
            "(a)/(b)",
            "peak RSS",
            "RSS limit",
            "decomposition time by engine",
        ],
        table,
    )
    return text


def main() -> None:
    """Run every regime and write results/pipeline.{json,md}."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="svdrank-bench-") as scratch:
        for name, regime in REGIMES.items():
            print(f"pipeline: {name} ...", flush=True)
            rows.append(run_regime(name, regime, Path(scratch)))
    env = machine()
    write_results("pipeline", {"machine": env, "repeats": REPEATS, "regimes": rows}, markdown)


if __name__ == "__main__":
    main()
