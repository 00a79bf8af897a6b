"""Matrices with known spectra, and reference ranks from NumPy's exact SVD in float64."""

from __future__ import annotations

import numpy as np

from svdrank.types import Analysis, AnalysisSettings, LayerResult, Spectrum

TARGETS = (0.85, 0.90, 0.95)


def planted(shape, sigma, dtype=np.float64, seed=0) -> np.ndarray:
    """A matrix with singular values ``sigma`` and random orthonormal singular vectors."""
    rng = np.random.default_rng(seed)
    m, n = shape
    u, _ = np.linalg.qr(rng.standard_normal((m, sigma.size)))
    v, _ = np.linalg.qr(rng.standard_normal((n, sigma.size)))
    return ((u * sigma) @ v.T).astype(dtype)


def spectrum_of(kind: str, size: int) -> np.ndarray:
    """The singular values of each test spectrum (distinct values: no ties at a target)."""
    i = np.arange(1, size + 1, dtype=np.float64)
    rank = 7
    low_rank = np.where(i <= rank, np.linspace(2.0, 1.0, size), 0.0)
    kinds = {
        "exact-rank-7": low_rank,
        "rank-7-plus-noise": low_rank + 0.01 * np.linspace(1.0, 0.9, size),
        "power-0.5": i**-0.5,
        "power-1": i**-1.0,
        "power-2": i**-2.0,
        "exponential": np.exp(-i / 10.0),
        "rank-1": np.where(i == 1, 3.0, 0.0),
    }
    return kinds[kind]


SPECTRA = (
    "exact-rank-7",
    "rank-7-plus-noise",
    "power-0.5",
    "power-1",
    "power-2",
    "exponential",
    "rank-1",
)


def reference_ranks(matrix: np.ndarray, targets=TARGETS) -> list[int]:
    """Ranks at each target from NumPy's float64 SVD (independent of svdrank)."""
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    curve = np.cumsum(sigma**2) / np.sum(sigma**2)
    return [int(np.argmax(curve >= target - 1e-12)) + 1 for target in targets]


def synthetic_analysis(
    spectra: list[np.ndarray],
    shapes: list[tuple[int, int]],
    modules: list[str] | None = None,
) -> Analysis:
    """An Analysis with complete spectra given directly (no checkpoints)."""
    modules = modules or [f"layers.{index}.proj" for index in range(len(spectra))]
    layers = []
    for module, values, shape in zip(modules, spectra, shapes, strict=True):
        values = np.sort(np.asarray(values, dtype=np.float64))[::-1]
        energy = float(np.sum(values**2))
        kind = module.rsplit(".", 1)[-1]
        block = next((int(part) for part in module.split(".") if part.isdigit()), None)
        layers.append(
            LayerResult(
                module=module,
                name=f"{module}.weight",
                kind=kind,
                block=block,
                role="linear",
                shape=shape,
                dtype="F32",
                delta_norm=energy**0.5,
                base_norm=1.0,
                spectrum=Spectrum(values, energy, True, "exact"),
            )
        )
    return Analysis({}, AnalysisSettings(), tuple(layers), ())
