"""Timing, matrices with planted spectra, and result writing shared by the benchmarks."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy

RESULTS = Path(__file__).resolve().parent / "results"
PRESET_TARGETS = (0.95, 0.90, 0.85)


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
