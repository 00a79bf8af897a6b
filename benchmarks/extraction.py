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
"""

from __future__ import annotations

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
    )


def main() -> None:
    """Run every model and regime and write results/extraction.{json,md}."""
    rows = []
    for model in MODELS:
        for name, regime in REGIMES.items():
            print(f"extraction: {model.name}, {name} ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="svdrank-bench-") as scratch:
                rows.append(run_regime(model, name, regime, Path(scratch)))
    write_results("extraction", {"machine": machine(), "repeats": REPEATS, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
