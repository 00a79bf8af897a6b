"""`svdrank diff --device cuda` against reading the checkpoints' bytes (7B-block shapes).

On a CUDA machine the decomposition should no longer set the pace: the target
is a run within 1.5× the time it takes to read the layers' bytes. Per regime
(the pipeline benchmark's BF16 pairs of one Llama-2-7B block: updates
decaying fast, mixed or slow), in one process and interleaved so that a noisy
spell hits all alike, medians of ``REPEATS``:

- **read**: every layer's stored bytes of both checkpoints read into memory
  (page cache warm, as in every run after the first);
- **cuda**: ``svdrank.analyze(..., device="cuda")`` (CUDA context made once
  before timing);
- **cpu**: the same analysis with NumPy and SciPy on the host's cores, the
  baseline.

Without a CUDA device (or without torch) the suite says so and writes
nothing. ``SVDRANK_BENCH_GPU=torch-cpu`` runs the same measurements on
torch's CPU device instead, to check the suite itself on a machine without a
GPU; its results are written under another name and are not a GPU figure.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPEATS, machine, markdown_table, write_results
from benchmarks.pipeline import MODELS, REGIMES, warm_page_cache, write_pair
from svdrank import analyze
from svdrank.inputs.checkpoint import open_checkpoint
from svdrank.inputs.pairing import pair_checkpoints

TARGET = 1.5
"""The run may take this many times the read time: reading-bound."""


def main() -> None:
    """Run the suite when CUDA is present (or ``SVDRANK_BENCH_GPU=torch-cpu``); else skip."""
    device = chosen_device()
    if device is None:
        print("gpu: skipped: torch sees no CUDA device (install svdrank[gpu] on a GPU machine)")
        return
    record: dict[str, Any] = {
        "machine": machine() | {"device": device_name(device)},
        "device": device,
        "repeats": REPEATS,
        "regimes": [],
    }
    model = MODELS[1]
    with tempfile.TemporaryDirectory(prefix="svdrank-bench-gpu-") as scratch:
        for name, regime in REGIMES.items():
            directory = Path(scratch) / name
            directory.mkdir()
            base, tuned = write_pair(directory, model, regime, seed=len(name))
            record["regimes"].append(measure(model.name, name, base, tuned, device))
    suffix = "" if device == "cuda" else f"-{device}"
    write_results(f"gpu{suffix}", record, markdown)


def chosen_device() -> str | None:
    """``cuda`` when torch sees one, the ``SVDRANK_BENCH_GPU`` override, else None."""
    override = os.environ.get("SVDRANK_BENCH_GPU")
    if override:
        return override
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return "cuda" if torch.cuda.is_available() else None


def device_name(device: str) -> str:
    """The GPU's name as torch reports it (or the device string)."""
    if device != "cuda":
        return device
    import torch

    return str(torch.cuda.get_device_name())


def read_layers(base: Path, tuned: Path) -> int:
    """Read every layer's stored bytes from both files into memory; return the bytes read."""
    pairing = pair_checkpoints(open_checkpoint(base), open_checkpoint(tuned))
    total = 0
    for layer in pairing.layers:
        for tensor in (layer.base, layer.tuned):
            with open(tensor.file, "rb") as stream:
                stream.seek(tensor.start)
                total += len(stream.read(tensor.nbytes))
    return total


def timed(run: Any) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def measure(model: str, regime: str, base: Path, tuned: Path, device: str) -> dict[str, Any]:
    """Interleaved read, device and host runs of one pair; medians and per-layer figures."""
    warm_page_cache(base, tuned)
    analyze(base, tuned, device=device, include=["*layers.0.self_attn.k_proj*"])  # CUDA context
    reads, on_device, on_host = [], [], []
    for _ in range(REPEATS):
        reads.append(timed(lambda: read_layers(base, tuned)))
        on_device.append(timed(lambda: analyze(base, tuned, device=device)))
        on_host.append(timed(lambda: analyze(base, tuned, device="cpu")))
    layers = analyze(base, tuned, device=device).layers
    read = statistics.median(reads)
    return {
        "model": model,
        "regime": regime,
        "bytes_read": read_layers(base, tuned),
        "read_seconds": read,
        "device_seconds": statistics.median(on_device),
        "host_seconds": statistics.median(on_host),
        "ratio_to_read": statistics.median(on_device) / read,
        "layer_seconds": {layer.name: layer.seconds for layer in layers},
    }


def markdown(record: dict[str, Any]) -> str:
    """The summary table, from the saved record."""
    env = record["machine"]
    rows = [
        [
            row["model"],
            row["regime"],
            f"{row['bytes_read'] / 1e6:.0f} MB",
            f"{row['read_seconds']:.2f} s",
            f"{row['device_seconds']:.2f} s",
            f"**{row['ratio_to_read']:.2f}**",
            f"{row['host_seconds']:.2f} s",
            f"{max(row['layer_seconds'].values()):.3f} s",
        ]
        for row in record["regimes"]
    ]
    text = f"# `svdrank diff --device {record['device']}` against reading the layers' bytes\n\n"
    text += (
        f"Machine: {env['cores']} cores, {env['device']}; numpy {env['numpy']}, "
        f"scipy {env['scipy']}. Medians of {record['repeats']} interleaved runs, page cache "
        f"warm; target: the device run within {TARGET}× the read time.\n\n"
    )
    if record["device"] != "cuda":
        text += "Not a GPU measurement: the suite checked on torch's CPU device.\n\n"
    header = [
        "pair",
        "regime",
        "bytes read",
        "read",
        record["device"],
        f"{record['device']}/read",
        "cpu (NumPy)",
        "slowest layer (decomposition)",
    ]
    return text + markdown_table(header, rows)
