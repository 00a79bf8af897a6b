"""`svdrank diff --cluster` against a local run with the same cores.

On generated TinyLlama-shaped BF16 pairs (4 blocks, as benchmarks/pipeline.py)
in two regimes, measured in the same run, page cache warm, runs interleaved:

- local: ``svdrank diff --workers 2`` (one process, two layers at once);
- cluster: ``svdrank diff --cluster tcp://…`` against a LocalCluster of two
  worker processes of one thread each, started once before the timed runs
  (so the timed part is what every run on a running cluster pays: connecting,
  checking the workers' files, one task per layer, the results streamed back);
- start-up, reported apart: ``svdrank diff --cluster local:2``, which starts
  and closes its own cluster.

Each command is a separate process (imports included in every column). The
analyses of the two paths are checked to be the same, timings aside.
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

import distributed

from benchmarks.common import REPEATS, machine, markdown_table, write_results
from benchmarks.pipeline import MODELS, REGIMES, warm_page_cache, write_pair

WORKERS = 2
MODEL = MODELS[0]
CASES = ("mixed", "slow")


def run_diff(base: Path, tuned: Path, output: Path, *options: str) -> float:
    """Wall time of one `svdrank diff` process with ``options``."""
    command = [sys.executable, "-m", "svdrank", "diff", str(base), str(tuned), "-o", str(output)]
    started = time.perf_counter()
    subprocess.run(
        [*command, "--format", "json", "--quiet", *options], stdout=subprocess.DEVNULL, check=True
    )
    return time.perf_counter() - started


def without_timings(output: Path) -> dict:
    """The analysis file without its per-layer seconds and creation time."""
    record = json.loads(output.read_text())
    del record["created"]
    for layer in record["layers"]:
        del layer["seconds"]
    return record


def run_case(name: str, address: str, scratch: Path) -> dict:
    """Measure one regime: local --workers 2, the running cluster, and local:2 with start-up."""
    directory = scratch / name
    directory.mkdir()
    base, tuned = write_pair(directory, MODEL, REGIMES[name], seed=len(name))
    warm_page_cache(base, tuned)
    options = {
        "local": ("--workers", str(WORKERS)),
        "cluster": ("--cluster", address),
        "startup": ("--cluster", f"local:{WORKERS}"),
    }
    outputs = {mode: directory / f"{mode}.json" for mode in options}
    run_diff(base, tuned, outputs["local"], *options["local"])  # warm-up
    times: dict[str, list[float]] = {mode: [] for mode in options}
    for _ in range(REPEATS):
        for mode, flags in options.items():
            times[mode].append(run_diff(base, tuned, outputs[mode], *flags))
    reference = without_timings(outputs["local"])
    same = all(without_timings(outputs[mode]) == reference for mode in ("cluster", "startup"))
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    return {
        "model": MODEL.name,
        "regime": name,
        "bytes_per_checkpoint": base.stat().st_size,
        "layers": len(reference["layers"]),
        "seconds": times,
        "local_seconds": medians["local"],
        "cluster_seconds": medians["cluster"],
        "local2_with_startup_seconds": medians["startup"],
        "ratio": medians["cluster"] / medians["local"],
        "same_analysis": same,
    }


def markdown(record: dict) -> str:
    """The summary table, from the saved record."""
    env = record["machine"]
    rows = [
        [
            row["model"],
            row["regime"],
            f"{row['bytes_per_checkpoint'] / 1e6:.0f} MB",
            row["layers"],
            f"{row['local_seconds']:.2f} s",
            f"{row['cluster_seconds']:.2f} s",
            f"{row['ratio']:.2f}",
            f"{row['local2_with_startup_seconds']:.2f} s",
            "yes" if row["same_analysis"] else "NO",
        ]
        for row in record["cases"]
    ]
    text = "# `svdrank diff --cluster` against a local run with the same cores\n\n"
    text += f"Machine: {env['cores']} cores; numpy {env['numpy']}, scipy {env['scipy']}, "
    text += f"dask {record['dask']}. Generated BF16 pairs; medians of {record['repeats']}, "
    text += "runs interleaved, each a separate `svdrank diff` process (imports included). "
    text += "Load average (1, 5, 15 min) before: "
    text += ", ".join(f"{load:.1f}" for load in record["load_average_before"])
    text += "; after: " + ", ".join(f"{load:.1f}" for load in record["load_average_after"])
    text += " (other work shares these cores: medians, not single runs).\n\n"
    text += (
        f"local: `--workers {WORKERS}`. cluster: `--cluster tcp://…` on a LocalCluster of "
        f"{WORKERS} worker processes × 1 thread started before the timed runs (its start-up "
        f"took {record['cluster_startup_seconds']:.2f} s). `local:{WORKERS}`: the command "
        "starts and closes its own cluster, start-up included. Target: cluster/local ≤ 1.10.\n\n"
    )
    text += markdown_table(
        [
            "model",
            "regime",
            "checkpoint",
            "layers",
            "local",
            "cluster",
            "cluster/local",
            f"local:{WORKERS} with start-up",
            "same analysis",
        ],
        rows,
    )
    return text


def main() -> None:
    """Start a LocalCluster, measure every case, write results/cluster.{json,md}."""
    load_before = os.getloadavg()
    started = time.perf_counter()
    with (
        distributed.LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.wait_for_workers(WORKERS)
        startup = time.perf_counter() - started
        cases = []
        for name in CASES:
            print(f"cluster: {MODEL.name}, {name} ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="svdrank-bench-") as scratch:
                cases.append(run_case(name, cluster.scheduler_address, Path(scratch)))
    record = {
        "machine": machine(),
        "dask": distributed.__version__,
        "repeats": REPEATS,
        "workers": WORKERS,
        "cluster_startup_seconds": startup,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cases": cases,
    }
    write_results("cluster", record, markdown)


if __name__ == "__main__":
    main()
