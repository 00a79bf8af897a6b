"""Timing, matrices with planted spectra, and result writing shared by the benchmarks."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import scipy
from safetensors.numpy import save_file

RESULTS = Path(__file__).resolve().parent / "results"
PRESET_TARGETS = (0.95, 0.90, 0.85)


REPEATS = 3
"""Every benchmark reports the median of this many runs (machines here are shared and noisy)."""


def median_seconds(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def planted_power_law(
    shape: tuple[int, int], alpha: float, components: int, noise: float, seed: int
) -> np.ndarray:
    """float32 U·diag(i^-alpha)·Vᵀ over ``components`` directions plus a Gaussian floor.

    The floor's singular values are about ``noise`` times σ_components, so the
    spectrum keeps decaying past the planted part instead of stopping dead.
    """
    rng = np.random.default_rng(seed)
    m, n = shape
    components = min(components, m, n)
    sigma = np.arange(1, components + 1, dtype=np.float32) ** -alpha
    u, _ = np.linalg.qr(rng.standard_normal((m, components), dtype=np.float32))
    v, _ = np.linalg.qr(rng.standard_normal((n, components), dtype=np.float32))
    matrix = (u * sigma) @ v.T
    floor = rng.standard_normal(shape, dtype=np.float32)
    floor *= noise * sigma[-1] / (np.sqrt(m) + np.sqrt(n))
    matrix += floor
    return matrix


def write_decaying_pair(
    directory: Path,
    shapes: dict[str, tuple[int, int]],
    alphas: dict[str, float],
    relative_change: float,
    seed: int,
) -> tuple[Path, Path]:
    """Write base.safetensors and tuned.safetensors (BF16) whose updates decay like i^-alpha.

    ΔW = G·diag(i^-alpha) for a Gaussian G, scaled to ‖ΔW‖/‖W‖ = relative_change,
    so σᵢ falls roughly like i^-alpha; a cheap stand-in for fine-tuning updates.
    """
    rng = np.random.default_rng(seed)
    base, tuned = {}, {}
    for name, shape in shapes.items():
        weight = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        decay = np.arange(1, shape[1] + 1, dtype=np.float32) ** np.float32(-alphas[name])
        delta = rng.standard_normal(shape, dtype=np.float32) * decay
        delta *= relative_change * np.linalg.norm(weight) / np.linalg.norm(delta)
        base[name] = weight.astype(ml_dtypes.bfloat16)
        tuned[name] = (weight + delta).astype(ml_dtypes.bfloat16)
    save_file(base, directory / "base.safetensors")
    save_file(tuned, directory / "tuned.safetensors")
    return directory / "base.safetensors", directory / "tuned.safetensors"


def ranks_from(values: np.ndarray, total: float) -> list[int | None]:
    """Ranks at the presets from (possibly truncated) values and the exact total energy."""
    curve = np.cumsum(np.square(values, dtype=np.float64)) / total
    ranks: list[int | None] = []
    for target in PRESET_TARGETS:
        index = int(np.searchsorted(curve, target, side="left"))
        ranks.append(index + 1 if index < curve.size else None)
    return ranks


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import os

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def write_results(
    name: str, record: dict[str, Any], markdown: Callable[[dict[str, Any]], str]
) -> None:
    """Write ``results/NAME.json``, then ``results/NAME.md`` rendered from that record.

    The measurements are saved before the table is rendered, so a rendering
    bug never loses a long run; ``python -m benchmarks.render NAME`` redoes it.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(record))


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
