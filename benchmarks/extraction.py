"""`svdrank extract` against `svdrank diff` on the same generated pairs: time and peak RSS.

The pairs are the pipeline benchmark's (BF16, Llama shapes, three decay
regimes). Extraction at the balanced preset reads the pair once: each layer is
analysed as ``diff`` analyses it, then its top-r singular vectors are computed
from the same ΔW and the engine's own work on it (the Gram matrix's
tridiagonal reduction, or the sketch's basis); the target is at most 1.5x
``diff``'s time, with a peak RSS within ``diff``'s bound (3x the largest
layer in float32 + 200 MB). Both commands run as separate processes,
interleaved, page cache warm; medians of REPEATS runs. The one-minute load
average before and after each pair is kept: on a shared machine a ratio
measured under load is only indicative.

Where the time goes: one more extraction of each TinyLlama pair runs in a
child process on one BLAS thread under cProfile with a thread-CPU clock,
which splits its CPU seconds into the analysis ``diff`` makes, forming ΔW,
T's eigenvectors (stevd), their back-transformation by the reduction's
reflectors (ormqr, 2·n²·r), ΔW·V (2·m·n·r) and the error of the factors.
The back-transformation and the product bound the ratio from below:
(analysis + forming + both) / (analysis + forming), whatever the rest costs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPEATS, machine, markdown_table, write_results
from benchmarks.pipeline import (
    MODELS,
    PEAK_RSS_PROBE,
    REGIMES,
    Model,
    layer_shapes,
    warm_page_cache,
    write_pair,
)


def run_command(arguments: list[str], report: Path) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one `svdrank` process."""
    command = [sys.executable, "-c", PEAK_RSS_PROBE, str(report), *arguments, "--quiet"]
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started, int(report.read_text()) * 1024


def run_regime(model: Model, name: str, regime: dict[str, float], scratch: Path) -> dict:
    """Time diff and extract on one pair; peak RSS of both."""
    base, tuned = write_pair(scratch, model, regime, seed=len(name))
    warm_page_cache(base, tuned)
    load_before = os.getloadavg()[0]
    diff_args = ["diff", str(base), str(tuned), "-o", str(scratch / "a.json"), "--format", "json"]
    extract_args = ["extract", str(base), str(tuned), "-o", str(scratch / "adapter")]
    extract_args += ["--preset", "balanced", "--format", "json"]
    diffs, extracts = [], []
    for _ in range(REPEATS):
        diffs.append(run_command(diff_args, scratch / "diff.peak"))
        extracts.append(run_command(extract_args, scratch / "extract.peak"))
    diff = statistics.median(seconds for seconds, _ in diffs)
    extract = statistics.median(seconds for seconds, _ in extracts)
    largest = max(m * n * 4 for m, n in layer_shapes(model).values())
    return {
        "model": model.name,
        "regime": name,
        "diff_seconds": diff,
        "extract_seconds": extract,
        "ratio": extract / diff,
        "diff_peak_rss_bytes": max(rss for _, rss in diffs),
        "extract_peak_rss_bytes": max(rss for _, rss in extracts),
        "rss_limit_bytes": 3 * largest + 200_000_000,
        "load_average": [load_before, os.getloadavg()[0]],
    }


def markdown(record: dict) -> str:
    """The summary table, from the saved record."""
    rows = [
        [
            row["model"],
            row["regime"],
            f"{row['diff_seconds']:.1f} s",
            f"{row['extract_seconds']:.1f} s",
            f"**{row['ratio']:.2f}**",
            f"{row['diff_peak_rss_bytes'] / 1e6:.0f} MB",
            f"{row['extract_peak_rss_bytes'] / 1e6:.0f} MB ({row['rss_limit_bytes'] / 1e6:.0f})",
            "/".join(f"{load:.1f}" for load in row.get("load_average", [])) or "?",
        ]
        for row in record["rows"]
    ]
    header = ["pair", "spectra", "diff", "extract --preset balanced", "ratio", "diff RSS"]
    header += ["extract RSS (limit)", "load before/after"]
    return (
        "# `svdrank extract` against `svdrank diff`\n\n"
        f"Machine: {record['machine']['cores']} cores; numpy {record['machine']['numpy']}, "
        f"scipy {record['machine']['scipy']}; medians of {record['repeats']}.\n\n"
        + (f"{record['note']}\n\n" if record.get("note") else "")
        + markdown_table(header, rows)
        + (split_markdown(record["splits"]) if record.get("splits") else "")
        + (solvers_markdown(record["solvers"]) if record.get("solvers") else "")
    )


STEVD = "T's vectors (stevd)"
STEPS = {
    "analysis": ["svdrank/analysis/pipeline.py:analyze_layer"],
    "forming": ["svdrank/analysis/delta.py:form_delta"],
    STEVD: ["svdrank/spectra/nogil.py:tridiagonal_eigh"],
    "Q·Z (ormqr)": ["svdrank/spectra/nogil.py:apply_reflectors"],
    "ΔW·V": ["svdrank/spectra/factors.py:vectors_svd"],
    "error": [
        "svdrank/spectra/factors.py:projected_residual_energy",
        "svdrank/spectra/factors.py:residual_energy",
    ],
}
"""The steps of a one-pass extraction whose CPU seconds are split out, by their functions."""
FLOOR_STEPS = ("Q·Z (ormqr)", "ΔW·V")
"""The work every extraction through the analysis's Gram reduction adds: the top r vectors
mapped back by its reflectors (2·n²·r flops) and the product that gives B (2·m·n·r)."""
SIDES = ("base", "tuned")
"""The pair's files in the scratch folder (``write_pair`` names them so)."""
SPLIT_PROBE = """
import cProfile, json, pstats, sys, tempfile, time
import svdrank
base, tuned, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
profile = cProfile.Profile(timer=time.thread_time)
with tempfile.TemporaryDirectory() as out:
    profile.runcall(svdrank.extract, base, tuned, out + "/adapter")
stats = pstats.Stats(profile).stats
seconds = {
    name: sum(row[3] for (file, _, function), row in stats.items()
              for where in wheres
              if file.endswith(where.split(":")[0]) and function == where.split(":")[1])
    for name, wheres in steps.items()
}
print(json.dumps(seconds))
"""
"""Runs one extraction under cProfile (thread CPU time) and prints each step's seconds."""


SOLVERS_PROBE = """
import json, sys, time
import numpy as np, scipy.linalg.lapack as lapack
from svdrank.analysis.delta import form_delta
from svdrank.inputs.checkpoint import open_checkpoint
from svdrank.inputs.pairing import pair_checkpoints
from svdrank.spectra.kernels import smaller_gram
from svdrank.spectra.tridiagonal import tridiagonal_eigenvalues, tridiagonalize
pairing = pair_checkpoints(open_checkpoint(sys.argv[1]), open_checkpoint(sys.argv[2]), (), ())
layer = max(pairing.layers, key=lambda layer: (min(layer.shape), max(layer.shape)))
reduction = tridiagonalize(smaller_gram(form_delta(layer, noise=False).delta))
d, e = reduction.diagonal, reduction.off_diagonal
n = d.size
values = tridiagonal_eigenvalues(reduction)[::-1]
rank = int(np.searchsorted(np.cumsum(values) / values.sum(), 0.9)) + 1
padded = np.append(e, np.float32(0))
lwork, liwork, _ = lapack.sstemr_lwork(d, padded, 3, 0, 0, n - rank + 1, n)
def best(call):
    times = []
    for _ in range(3):
        started = time.perf_counter(); out = call(); times.append(time.perf_counter() - started)
    return min(times), out
# Each call on fresh copies: stemr overwrites its inputs.
stevd, out = best(lambda: lapack.sstevd(d.copy(), e.copy()))
assert out[-1] == 0
stemr, out = best(lambda: lapack.sstemr(d.copy(), padded.copy(), 3, 0, 0, n - rank + 1, n,
                                        lwork=int(lwork), liwork=int(liwork)))
assert out[-1] == 0 and out[0] == rank
vectors = out[2][:, :rank].astype(np.float64)
orthogonality = float(np.abs(vectors.T @ vectors - np.eye(rank)).max())
stebz, out = best(lambda: lapack.sstebz(d.copy(), e.copy(), 3, 0, 0, n - rank + 1, n, 0.0, "B"))
assert out[-1] == 0
print(json.dumps({"layer": layer.name, "n": n, "rank": rank, "stevd": stevd, "stemr": stemr,
                  "stemr_orthogonality": orthogonality, "stebz": stebz}))
"""
"""Times the tridiagonal eigensolvers that could give one layer's top-r vectors (one thread)."""


def time_solvers(base: Path, tuned: Path) -> dict:
    """stevd (all vectors), stemr (top r) and stebz (top r values only) on one layer's T."""
    environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-c", SOLVERS_PROBE, str(base), str(tuned)]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def time_split(base: Path, tuned: Path) -> dict[str, float]:
    """CPU seconds of each of :data:`STEPS` in one extraction on one BLAS thread.

    The forming runs in the reader thread, which cProfile does not follow:
    its seconds come from a second, plain run of ``form_delta`` over the layers.
    """
    environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-c", SPLIT_PROBE, str(base), str(tuned), json.dumps(STEPS)]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    seconds: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    seconds["forming"] = forming_seconds(base, tuned)
    return seconds


def forming_seconds(base: Path, tuned: Path) -> float:
    """CPU seconds of forming every layer's ΔW with its noise bounds, as extraction does."""
    from svdrank.analysis.delta import form_delta
    from svdrank.inputs.checkpoint import open_checkpoint
    from svdrank.inputs.pairing import pair_checkpoints

    pairing = pair_checkpoints(open_checkpoint(base), open_checkpoint(tuned), (), ())
    started = time.thread_time()
    for layer in pairing.layers:
        form_delta(layer, noise=True)
    return time.thread_time() - started


def split_bound(seconds: dict[str, float], steps: tuple[str, ...] = FLOOR_STEPS) -> float:
    """The least extract/diff CPU ratio the given steps allow, everything else free."""
    diff = seconds["analysis"] + seconds["forming"]
    return (diff + sum(seconds[step] for step in steps)) / diff


def split_markdown(splits: list[dict]) -> str:
    """The where-the-time-goes table, from the saved record."""
    rows = [
        [
            split["pair"],
            *(f"{split['seconds'][name]:.2f} s" for name in STEPS),
            f"{split_bound(split['seconds']):.2f}",
            f"{split_bound(split['seconds'], (*FLOOR_STEPS, STEVD)):.2f}",
        ]
        for split in splits
    ]
    header = ["pair (1 BLAS thread, CPU)", *STEPS, "ratio floor: Q·Z + ΔW·V", "+ stevd"]
    return (
        "\n\n## Where the time goes\n\n"
        "One extraction per pair under cProfile (thread CPU time, one BLAS thread). "
        "Extraction repeats the analysis (its Gram matrix's tridiagonal reduction is kept) "
        "and adds: T's eigenvectors (stevd), the top r mapped back by the reduction's "
        "reflectors (ormqr, 2·n²·r flops), ΔW·V for the factors (2·m·n·r) and the error of "
        "the factors as stored (from the projection and the rounding: O((m + n)·r)). The "
        "floor columns are (analysis + forming + those steps) / (analysis + forming), "
        "whatever the rest costs.\n\n" + markdown_table(header, rows)
    )


def solvers_markdown(solvers: list[dict]) -> str:
    """The table of tridiagonal eigensolvers, from the saved record."""
    rows = [
        [
            f"{run['pair']}: {run['layer']}",
            f"{run['n']}",
            f"{run['rank']}",
            f"{run['stevd']:.3f} s",
            f"{run['stemr']:.3f} s ({run['stemr_orthogonality']:.0e})",
            f"{run['stebz']:.3f} s",
        ]
        for run in solvers
    ]
    header = ["layer (1 BLAS thread, wall)", "n", "r (90 %)", "stevd: all vectors"]
    header += ["stemr: top r (largest entry of ZᵀZ − I)", "stebz: top r values only"]
    return (
        "\n\n## T's top-r eigenvectors: the solvers\n\n"
        "The widest layer's tridiagonal T from the same pair, best of 3. Divide and "
        "conquer (stevd) computes all n vectors and is still the cheapest way to the top "
        "r here: MRRR (stemr) for the top r alone takes longer and loses orthogonality "
        "in float32, and bisection (stebz) for the top r values alone, before inverse "
        "iteration adds the vectors, costs about as much as stevd.\n\n"
        + markdown_table(header, rows)
    )


def main() -> None:
    """Run every model and regime and write results/extraction.{json,md}."""
    rows: list[dict] = []
    splits: list[dict] = []
    solvers: list[dict] = []
    for model in MODELS:
        for name, regime in REGIMES.items():
            print(f"extraction: {model.name}, {name} ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="svdrank-bench-") as scratch:
                rows.append(run_regime(model, name, regime, Path(scratch)))
                if model is MODELS[0] and name != "fast":
                    base, tuned = (Path(scratch) / f"{side}.safetensors" for side in SIDES)
                    print(f"extraction: {model.name}, {name}, where the time goes ...", flush=True)
                    seconds = time_split(base, tuned)
                    splits.append({"pair": f"{model.name}, {name}", "seconds": seconds})
                    solvers.append({"pair": f"{model.name}, {name}", **time_solvers(base, tuned)})
    record = {"machine": machine(), "repeats": REPEATS, "rows": rows, "splits": splits}
    record["solvers"] = solvers
    write_results("extraction", record, markdown)


if __name__ == "__main__":
    main()
