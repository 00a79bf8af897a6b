"""`svdrank diff` end to end against the compute floor, on generated Llama-shaped pairs.

Two models, BF16, no embeddings (so the largest layer is an MLP matrix, which
makes the memory bound strict): the issue's pair, 4 blocks of TinyLlama's
shapes (hidden 2048, MLP 5632, grouped-query k/v of 256x2048), and one block
of Llama-2-7B's (hidden 4096, MLP 11008), to see how the time per block
scales. ΔW = G·diag(i^-α) for a Gaussian G, so σᵢ decays roughly like i^-α;
three regimes:

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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

from benchmarks.common import (
    REPEATS,
    machine,
    markdown_table,
    median_seconds,
    write_decaying_pair,
    write_results,
)
from svdrank.inputs.checkpoint import open_checkpoint, read_tensor_view
from svdrank.inputs.pairing import Layer, pair_checkpoints


@dataclass(frozen=True)
class Model:
    """The shapes of a generated Llama-like checkpoint."""

    name: str
    blocks: int
    hidden: int
    mlp: int
    kv: int


MODELS = (
    Model("TinyLlama x 4 blocks", 4, 2048, 5632, 256),
    Model("Llama-2-7B x 1 block", 1, 4096, 11008, 4096),
)
REGIMES = {
    "slow": {"attention": 0.5, "mlp": 0.5},
    "mixed": {"attention": 1.0, "mlp": 0.5},
    "fast": {"attention": 1.0, "mlp": 1.0},
}


def layer_shapes(model: Model) -> dict[str, tuple[int, int]]:
    """Every weight matrix of the model with its (out, in) shape."""
    hidden, mlp_width, kv = model.hidden, model.mlp, model.kv
    shapes = {}
    for block in range(model.blocks):
        attn, mlp = f"model.layers.{block}.self_attn", f"model.layers.{block}.mlp"
        shapes |= {
            f"{attn}.q_proj.weight": (hidden, hidden),
            f"{attn}.k_proj.weight": (kv, hidden),
            f"{attn}.v_proj.weight": (kv, hidden),
            f"{attn}.o_proj.weight": (hidden, hidden),
            f"{mlp}.gate_proj.weight": (mlp_width, hidden),
            f"{mlp}.up_proj.weight": (mlp_width, hidden),
            f"{mlp}.down_proj.weight": (hidden, mlp_width),
        }
    return shapes


def write_pair(
    directory: Path, model: Model, regime: dict[str, float], seed: int
) -> tuple[Path, Path]:
    """Write the BF16 pair of one model and regime."""
    shapes = layer_shapes(model)
    alphas = {name: regime["mlp" if ".mlp." in name else "attention"] for name in shapes}
    return write_decaying_pair(directory, shapes, alphas, relative_change=0.1, seed=seed)


def floor(base: Path, tuned: Path, whole: frozenset[str] = frozenset()) -> None:
    """Read both files, form every ΔW (float32) and one Gram product per layer.

    For the layers named in ``whole`` also run the values-only eigensolver on
    the Gram matrix: the least any exact method pays for a complete spectrum.
    """
    pairing = pair_checkpoints(open_checkpoint(base), open_checkpoint(tuned))
    for layer in pairing.layers:
        gram = layer_floor(layer)
        if layer.name in whole:
            scipy.linalg.eigh(gram, eigvals_only=True, lower=True, driver="evr", overwrite_a=True)


def layer_floor(layer: Layer) -> np.ndarray:
    """The floor's work on one layer: form ΔW in float32, then its smaller Gram matrix by SYRK.

    Returns the Gram matrix (lower triangle set, Fortran order).
    """
    delta = np.subtract(
        read_tensor_view(layer.tuned), read_tensor_view(layer.base), dtype=np.float32
    )
    m, n = delta.shape
    return scipy.linalg.blas.ssyrk(1.0, delta.T, trans=0 if m >= n else 1, lower=1)


def needing_whole_spectrum(analysis: Path) -> frozenset[str]:
    """The layers whose complete spectrum `diff` computed by the Gram eigensolver."""
    return frozenset(
        layer["name"]
        for layer in json.loads(analysis.read_text())["layers"]
        if layer["engine"] == "gram" and layer["complete"]
    )


PEAK_RSS_PROBE = """
import atexit, runpy, sys
report = sys.argv.pop(1)
def write_peak():
    status = open("/proc/self/status").read().split("\\n")
    peak = next(line for line in status if line.startswith("VmHWM:"))
    open(report, "w").write(peak.split()[1])
atexit.register(write_peak)
sys.argv[0] = "svdrank"
runpy.run_module("svdrank", run_name="__main__")
"""
"""Runs `svdrank` and writes its peak RSS (VmHWM, kB) to a file at exit.

The rusage of a child (os.wait4) is no good here: Linux carries the parent's
resident size at fork into the child's ru_maxrss across exec, so a benchmark
process holding 1 GB would report 1 GB for every command it starts."""


def run_diff(base: Path, tuned: Path, output: Path, *options: str) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one `svdrank diff` process (extra ``options``)."""
    report = output.with_suffix(".peak-rss")
    command = [
        sys.executable,
        "-c",
        PEAK_RSS_PROBE,
        str(report),
        "diff",
        str(base),
        str(tuned),
        "-o",
        str(output),
        "--format",
        "json",
        "--quiet",
        *options,
    ]
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
    seconds = time.perf_counter() - started
    return seconds, int(report.read_text()) * 1024


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
        name = layer["engine"] + ("" if layer["complete"] else " (top k)")
        entry = totals.setdefault(name, {"layers": 0, "seconds": 0.0})
        entry["layers"] += 1
        entry["seconds"] += layer["seconds"]
    return totals


def run_regime(model: Model, name: str, regime: dict[str, float], scratch: Path) -> dict:
    """Measure one model and regime: floor, diff wall time, RSS, where the time went."""
    directory = scratch / name
    directory.mkdir()
    base, tuned = write_pair(directory, model, regime, seed=len(name))
    warm_page_cache(base, tuned)
    output = directory / "analysis.json"
    run_diff(base, tuned, output)  # learn which layers need their whole spectrum
    whole = needing_whole_spectrum(output)
    floors, bounds, runs = [], [], []
    for _ in range(REPEATS):  # interleaved, so that a noisy spell hits all three alike
        floors.append(median_seconds(lambda: floor(base, tuned), 1)[0])
        runs.append(run_diff(base, tuned, output))
        bounds.append(median_seconds(lambda: floor(base, tuned, whole), 1)[0])
    floor_time, bound = statistics.median(floors), statistics.median(bounds)
    diff = statistics.median(seconds for seconds, _ in runs)
    peak = max(rss for _, rss in runs)
    largest = max(m * n * 4 for m, n in layer_shapes(model).values())
    result = {
        "model": model.name,
        "regime": name,
        "alpha": regime,
        "bytes_per_checkpoint": base.stat().st_size,
        "floor_seconds": floor_time,
        "diff_seconds": diff,
        "ratio": diff / floor_time,
        "floor_with_eigensolves_seconds": bound,
        "layers_needing_whole_spectrum": len(whole),
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
                row["model"],
                f"{row['bytes_per_checkpoint'] / 1e6:.0f} MB",
                row["regime"],
                f"{row['floor_seconds']:.2f} s",
                f"{row['diff_seconds']:.2f} s",
                f"{row['ratio']:.2f}",
                f"{row['floor_with_eigensolves_seconds']:.2f} s "
                f"({row['layers_needing_whole_spectrum']} eigensolves)",
                f"{row['diff_seconds'] / row['floor_with_eigensolves_seconds']:.2f}",
                f"{row['peak_rss_bytes'] / 1e6:.0f} MB",
                f"{row['rss_limit_bytes'] / 1e6:.0f} MB",
                engines,
            ]
        )
    text = "# `svdrank diff` against the compute floor\n\n"
    text += f"Machine: {env['cores']} cores; numpy {env['numpy']}, scipy {env['scipy']}. "
    text += "Generated BF16 pairs (size per checkpoint below); "
    text += f"medians of {record['repeats']}; "
    text += "floor = read both files + form every ΔW + one ΔWᵀΔW per layer, same run.\n\n"
    text += (
        "(c) adds to the floor LAPACK's values-only eigensolver (syevr) on the Gram matrix "
        "of each layer whose spectrum decays too slowly for a truncated method (those "
        "`diff` gave a complete Gram spectrum): the least an exact method pays for those "
        "spectra. (a) includes the process start (~0.5 s of imports); (b) and (c) run "
        "in-process. Runs of (a), (b), (c) are interleaved.\n\n"
    )
    text += markdown_table(
        [
            "model",
            "checkpoint",
            "regime",
            "(b) floor",
            "(a) diff",
            "(a)/(b)",
            "(c) floor + eigensolves",
            "(a)/(c)",
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
    for model in MODELS:
        for name, regime in REGIMES.items():
            print(f"pipeline: {model.name}, {name} ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="svdrank-bench-") as scratch:
                rows.append(run_regime(model, name, regime, Path(scratch)))
    env = machine()
    write_results("pipeline", {"machine": env, "repeats": REPEATS, "regimes": rows}, markdown)


if __name__ == "__main__":
    main()
