"""Forming ΔW: one pass over the two memory-mapped tensors of a layer.

This is where the inputs meet the numerics: the subtraction reads the stored
tensors and the float64 sums of squares come from the spectra stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from svdrank.inputs.checkpoint import DTYPES, forget_pages, read_tensor_view
from svdrank.spectra.kernels import require_finite, sum_of_squares
from svdrank.spectra.noise import (
    GRIDS,
    ProfileBounds,
    rounding_variance,
    smallest_variance,
    square_scale,
    storage_grid,
)
from svdrank.types import ROUNDING_GRIDS, Layer


def layer_bytes(layer: Layer) -> int:
    """Bytes read from both checkpoints for one layer."""
    return layer.base.nbytes + layer.tuned.nbytes


@dataclass(frozen=True)
class Rounding:
    """How the stored values of a layer were rounded: what its noise model starts from.

    Attributes
    ----------
    grids : tuple of str
        The grids of the base and tuned values (see
        :func:`svdrank.spectra.noise.storage_grid`).
    bounds : ProfileBounds
        Bounds on the noise's variance profile, from the squares of the
        rounded sides (see :class:`svdrank.spectra.noise.ProfileBounds`).
    unchanged : int
        The entries with ΔW = 0 (stored tuned and base equal).
    """

    grids: tuple[str, str]
    bounds: ProfileBounds
    unchanged: int

    @property
    def roundings(self) -> int:
        """How many sides are on a rounding grid (1 or 2)."""
        return self.bounds.roundings


@dataclass(frozen=True)
class FormedDelta:
    """One layer's update as the reader hands it over: ΔW and the sums formed with it.

    ``rounding`` is None when noise was not asked for or neither side is on a
    rounding grid (F32/F64 pairs).
    """

    delta: np.ndarray
    total_energy: float
    base_norm: float
    rounding: Rounding | None = None


PROFILE_BLOCK_ELEMENTS = 1 << 16
"""The noise-profile pass widens this many entries at a time (256 kB of float32: in cache)."""
FORM_CHUNK_BYTES = 16 << 20
"""ΔW is formed this many bytes of each input at a time, each chunk's pages dropped after."""


def form_delta(layer: Layer, noise: bool = False) -> FormedDelta:
    """ΔW in float32 (float64 when an input is F64), ‖ΔW‖_F² and ‖W_base‖_F.

    One pass over the two memory-mapped tensors, a chunk of rows at a time:
    the subtraction casts as it goes, so no widened copy of either input is
    made, and each chunk's mapped pages are dropped once used (they would
    otherwise count in the resident size until the layer is done: 2 × 90 MB
    for a 7B MLP layer in BF16). The sums of squares accumulate in float64
    (see ``sum_of_squares``).

    With ``noise``, the same pass bounds the rounding-noise profile of every
    side stored on a BF16, F16 or F8 grid (row, column and total sums of its
    squares: no per-entry variance, no extra layer in memory) and counts the
    unchanged entries.

    Raises
    ------
    NumericalError
        If ΔW holds NaN or Inf.
    """
    rows, columns = layer.shape
    base = _matrix(read_tensor_view(layer.base), layer)
    tuned = _matrix(read_tensor_view(layer.tuned), layer)
    wide = np.float64 if "F64" in (layer.base.dtype, layer.tuned.dtype) else np.float32
    delta = np.empty(layer.shape, dtype=wide)
    row_bytes = max(columns * max(base.itemsize, tuned.itemsize), 1)
    step = max(1, FORM_CHUNK_BYTES // row_bytes)
    sides = _rounded_sides(base, layer.base.dtype, tuned, layer.tuned.dtype) if noise else None
    profile = _ProfileSums(layer.shape, sides) if sides else None
    base_energy = 0.0
    for start in range(0, rows, step):
        chunk = slice(start, start + step)
        np.subtract(tuned[chunk], base[chunk], out=delta[chunk], dtype=wide)
        base_energy += sum_of_squares(base[chunk])
        if profile is not None:
            profile.add(delta[chunk], base[chunk], tuned[chunk])
        forget_pages(tuned[chunk])
        forget_pages(base[chunk])
    energy = require_finite(sum_of_squares(delta), layer.name)
    rounding = None if profile is None or sides is None else profile.rounding(sides)
    return FormedDelta(delta, energy, math.sqrt(base_energy), rounding)


def layer_variance(layer: Layer, grids: tuple[str, str]) -> np.ndarray:
    """Per-entry rounding variance of a layer's ΔW: the sum over its rounded sides.

    A second pass over the stored tensors (one float32 layer), made only for
    layers whose threshold needs the full noise-floor estimate.
    """
    variance = np.zeros(layer.shape, dtype=np.float32)
    sides = (read_tensor_view(layer.base), read_tensor_view(layer.tuned))
    for grid, stored in zip(grids, sides, strict=True):
        if grid in ROUNDING_GRIDS:
            matrix = _matrix(stored, layer)
            step = max(1, FORM_CHUNK_BYTES // max(layer.shape[1] * matrix.itemsize, 1))
            for start in range(0, layer.shape[0], step):
                chunk = slice(start, start + step)
                variance[chunk] += rounding_variance(matrix[chunk], grid)
                forget_pages(matrix[chunk])
    return variance


def _rounded_sides(
    base: np.ndarray, base_dtype: str, tuned: np.ndarray, tuned_dtype: str
) -> tuple[str, str] | None:
    """Name the grids of base and tuned when one rounds and both have a model, else None."""
    grids = (storage_grid(base, base_dtype), storage_grid(tuned, tuned_dtype))
    if not any(grid in ROUNDING_GRIDS for grid in grids) or not all(g in GRIDS for g in grids):
        return None
    return grids


class _ProfileSums:
    """Row, column and total sums of the variance bounds, accumulated chunk by chunk.

    Each rounded side adds x²·4^(−p)/12 (its grid's :func:`square_scale`) plus
    its smallest variance per entry. The stored values are widened to float32
    a cache-sized block of rows at a time into one reused buffer, and summed
    there (rows and columns by einsum, totals in float64), so the pass costs
    about a nanosecond per entry and side and no memory beyond the buffer.
    """

    def __init__(self, shape: tuple[int, int], grids: tuple[str, str]) -> None:
        self.scales = [
            (square_scale(grid), smallest_variance(grid)) if grid in ROUNDING_GRIDS else None
            for grid in grids
        ]
        self.columns = np.zeros(shape[1])
        self.row_max = self.energy = self.entry_max = 0.0
        self.changed = 0
        self.size = shape[0] * shape[1]
        self.block_rows = max(1, PROFILE_BLOCK_ELEMENTS // max(shape[1], 1))
        self.buffer = np.empty((self.block_rows, shape[1]), dtype=np.float32)

    def add(self, delta: np.ndarray, *sides: np.ndarray) -> None:
        """Add one chunk of rows: ΔW's chunk, then the base's and the tuned's."""
        self.changed += int(np.count_nonzero(delta))
        rows = np.zeros(delta.shape[0])
        largest = 0.0
        for scale, stored in zip(self.scales, sides, strict=True):
            if scale is None:
                continue
            square, smallest = scale
            sums, columns, peak = self._squares(stored)
            rows += square * sums + smallest * delta.shape[1]
            self.columns += square * columns + smallest * delta.shape[0]
            largest += square * peak + smallest
        self.row_max = max(self.row_max, float(rows.max(initial=0.0)))
        self.energy += float(rows.sum())
        self.entry_max = max(self.entry_max, largest)

    def _squares(self, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Sum x² over each row and each column of a chunk; also the largest x²."""
        sums = np.empty(stored.shape[0])
        columns = np.zeros(stored.shape[1])
        peak = 0.0
        for start in range(0, stored.shape[0], self.block_rows):
            block = self.buffer[: min(self.block_rows, stored.shape[0] - start)]
            _widen(stored[start : start + block.shape[0]], block)
            np.square(block, out=block)
            sums[start : start + block.shape[0]] = block.sum(axis=1)
            columns += block.sum(axis=0)
            peak = max(peak, float(block.max(initial=0.0)))
        return sums, columns, peak

    def rounding(self, grids: tuple[str, str]) -> Rounding:
        """Make the layer's Rounding once every chunk is in."""
        roundings = sum(scale is not None for scale in self.scales)
        bounds = ProfileBounds(
            self.energy,
            self.row_max,
            float(self.columns.max(initial=0.0)),
            self.entry_max,
            roundings,
        )
        return Rounding(grids, bounds, self.size - self.changed)


def _widen(stored: np.ndarray, out: np.ndarray) -> None:
    """Widen stored values into a float32 buffer of their shape, exactly.

    BF16 is the top half of a float32 word, so a shift widens it (about 3.5×
    faster here than ml_dtypes' cast, which the other dtypes use).
    """
    if stored.dtype == DTYPES["BF16"]:
        words = out.view(np.uint32)
        np.copyto(words, stored.view(np.uint16), casting="unsafe")
        np.left_shift(words, 16, out=words)
    else:
        np.copyto(out, stored, casting="unsafe")


def _matrix(stored: np.ndarray, layer: Layer) -> np.ndarray:
    """View a stored tensor as the layer's matrix: one expert of a fused tensor, or reshaped."""
    if layer.part is not None:
        stored = stored[layer.part]
    return stored.reshape(layer.shape)
