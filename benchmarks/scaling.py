"""Per-layer cost of `svdrank diff` at 7B and 70B shapes: the README's scaling model.

A pair of Llama-2-7B or Llama-2-70B checkpoints has a handful of distinct
layer shapes, each repeated once per block. For each shape this suite writes
a one-layer BF16 pair whose update decays slowly (every value needed: the
Gram eigensolver's worst case, as real full fine-tunes measured) or fast (a
short sketch answers), and analyses it in a child process pinned to one BLAS
thread. It reports the child's CPU seconds (core-seconds: what the layer costs
whichever machine runs it, and robust to other work on a shared machine), its
wall seconds and peak RSS, and the layer's stored bytes. A model's total is
the per-shape figures times how often each shape occurs.

The README's scaling model reads these figures: on N workers of c cores each,
with aggregate read bandwidth B, a run takes about
max(bytes read / B, core-seconds / (N·c)) plus the slowest layer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import machine, markdown_table, write_decaying_pair, write_results

MODELS: dict[str, dict[str, Any]] = {
    "Llama-2-7B": {
        "blocks": 32,
        "shapes": {
            "q_proj, k_proj, v_proj, o_proj": ((4096, 4096), 4),
            "gate_proj, up_proj": ((11008, 4096), 2),
            "down_proj": ((4096, 11008), 1),
        },
    },
    "Llama-2-70B": {
        "blocks": 80,
        "shapes": {
            "q_proj, o_proj": ((8192, 8192), 2),
            "k_proj, v_proj": ((1024, 8192), 2),
            "gate_proj, up_proj": ((28672, 8192), 2),
            "down_proj": ((8192, 28672), 1),
        },
    },
}
"""Each model's blocks and distinct layer shapes (out, in), with how often each occurs per block."""

REGIMES = {"slow": 0.5, "fast": 1.0}
"""The update's decay exponent: σᵢ falls like i^-alpha."""

CHILD = """
import json, sys, time
from svdrank import analyze
def peak_rss():
    status = open("/proc/self/status").read().split("\\n")
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
wall, cpu = time.perf_counter(), time.process_time()
layer = analyze(sys.argv[1], sys.argv[2]).layers[0]
print(json.dumps({
    "cpu_seconds": time.process_time() - cpu,
    "wall_seconds": time.perf_counter() - wall,
    "peak_rss_bytes": peak_rss(),
    "engine": layer.spectrum.engine,
    "complete": layer.spectrum.complete,
    "values": int(layer.spectrum.k),
}))
"""
"""Analyses one pair in a fresh process; prints its CPU and wall seconds and peak RSS as JSON.

Peak RSS is VmHWM, not rusage: Linux carries the parent's resident size at
fork into a child's ru_maxrss, and the parent holds the generated pair."""


def main() -> None:
    """Measure every distinct shape of both models in both regimes; write results/scaling.*."""
    record: dict[str, Any] = {"machine": machine(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="svdrank-bench-scaling-") as scratch:
        for model, spec in MODELS.items():
            record["models"][model] = {"blocks": spec["blocks"], "shapes": []}
            for kinds, (shape, count) in spec["shapes"].items():
                row = {"kinds": kinds, "shape": list(shape), "per_block": count}
                for regime, alpha in REGIMES.items():
                    row[regime] = measure_layer(Path(scratch), shape, alpha)
                record["models"][model]["shapes"].append(row)
    write_results("scaling", record, markdown)


def measure_layer(scratch: Path, shape: tuple[int, int], alpha: float) -> dict[str, Any]:
    """Analyse a one-layer BF16 pair of ``shape`` in a child on one BLAS thread."""
    directory = scratch / "pair"
    directory.mkdir(exist_ok=True)
    base, tuned = write_decaying_pair(
        directory, {"proj.weight": shape}, {"proj.weight": alpha}, relative_change=0.1, seed=0
    )
    env = os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(base), str(tuned)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(completed.stdout)
    result["bytes_read"] = base.stat().st_size + tuned.stat().st_size
    base.unlink()
    tuned.unlink()
    return result


def totals(spec: dict[str, Any], regime: str) -> tuple[float, float]:
    """A whole model's core-seconds and bytes read (both checkpoints) in one regime."""
    seconds = bytes_read = 0.0
    for row in spec["shapes"]:
        layers = row["per_block"] * spec["blocks"]
        seconds += layers * row[regime]["cpu_seconds"]
        bytes_read += layers * row[regime]["bytes_read"]
    return seconds, bytes_read


def markdown(record: dict[str, Any]) -> str:
    """Per-shape figures and per-model totals, from the saved record."""
    env = record["machine"]
    text = "# Per-layer cost at 7B and 70B shapes (the README's scaling model)\n\n"
    text += (
        f"Machine: {env['cores']} cores; numpy {env['numpy']}, scipy {env['scipy']}. "
        "One layer per child process on one BLAS thread: CPU seconds are core-seconds. "
        "Slow: σᵢ ∝ i^-0.5 (every value needed); fast: σᵢ ∝ i^-1. One run each.\n\n"
    )
    rows = []
    for model, spec in record["models"].items():
        for row in spec["shapes"]:
            slow, fast = row["slow"], row["fast"]
            rows.append(
                [
                    model,
                    row["kinds"],
                    "×".join(map(str, row["shape"])),
                    row["per_block"] * spec["blocks"],
                    f"{slow['bytes_read'] / 1e6:.0f} MB",
                    f"{slow['cpu_seconds']:.1f} s ({slow['engine']})",
                    f"{fast['cpu_seconds']:.1f} s ({fast['engine']})",
                    f"{max(slow['peak_rss_bytes'], fast['peak_rss_bytes']) / 1e9:.2f} GB",
                ]
            )
    header = ["model", "layers", "shape", "count", "bytes read", "slow", "fast", "peak RSS"]
    text += markdown_table(header, rows) + "\n"
    summary = []
    for model, spec in record["models"].items():
        slow_seconds, bytes_read = totals(spec, "slow")
        fast_seconds, _ = totals(spec, "fast")
        summary.append(
            [
                model,
                f"{bytes_read / 1e9:.0f} GB",
                f"{slow_seconds / 3600:.1f} h",
                f"{fast_seconds / 3600:.2f} h",
            ]
        )
    text += markdown_table(
        ["model", "bytes read (both)", "core-hours, slow", "core-hours, fast"], summary
    )
    return text
