"""Forming ΔW: one pass over the two memory-mapped tensors of a layer.

This is where the inputs meet the numerics: the subtraction reads the stored
tensors and the float64 sums of squares come from the spectra stage. ΔW is
formed where its spectrum will be computed: here on the host, or, for torch
kernels, on their device (:mod:`svdrank.analysis.device_delta`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from svdrank.inputs.checkpoint import DTYPES, forget_pages, read_tensor_view
from svdrank.spectra.devices import HOST, Kernels
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

    ``delta`` is an ndarray on the host, or a tensor on the torch device that
    formed it (see :func:`form_delta`): :meth:`host_delta` brings it back for
    the steps that run on the host. ``rounding`` is None when noise was not
    asked for or neither side is on a rounding grid (F32/F64 pairs).
    """

    delta: Any
    total_energy: float
    base_norm: float
    rounding: Rounding | None = None

    @property
    def size(self) -> int:
        """The entries of ΔW (m·n), wherever it is."""
        return math.prod(self.delta.shape)

    def host_delta(self) -> np.ndarray:
        """Return ΔW as a host ndarray: itself on the host, else a copy from its device."""
        if isinstance(self.delta, np.ndarray):
            return self.delta
        return self.delta.cpu().numpy()


PROFILE_BLOCK_ELEMENTS = 1 << 16
"""ΔW is formed from blocks of this many entries of each input, widened (256 kB of float32:
in cache), from which the noise profile's sums are taken too."""
FORM_CHUNK_BYTES = 16 << 20
"""ΔW is formed this many bytes of each input at a time, each chunk's pages dropped after."""


def form_delta(layer: Layer, noise: bool = False, kernels: Kernels = HOST) -> FormedDelta:
    """Form one layer's ΔW where its spectrum will be computed: the one place that chooses.

    The host kernels get :func:`form_on_host`'s ndarray; torch kernels get ΔW
    formed on their device from the stored bytes
    (:func:`svdrank.analysis.device_delta.form_on_device`, which imports
    torch: imported only then). Both give the same ΔW, bit for bit, and the
    same sums up to rounding: the host's products and block sums round in
    float32 (relative errors of order 2⁻²⁴), the device's do not.

    Parameters
    ----------
    layer : Layer
    noise : bool
        Also bound the rounding-noise profile (see :func:`form_on_host`).
    kernels : Kernels
        Where the layer will be decomposed (:func:`svdrank.spectra.devices.kernels_for`).

    Returns
    -------
    FormedDelta

    Raises
    ------
    NumericalError
        If ΔW holds NaN or Inf.
    """
    if kernels.device == HOST.device:
        return form_on_host(layer, noise)
    from svdrank.analysis.device_delta import form_on_device

    return form_on_device(layer, noise, kernels)


def form_on_host(layer: Layer, noise: bool = False) -> FormedDelta:
    """ΔW in float32 (float64 when an input is F64), ‖ΔW‖_F² and ‖W_base‖_F.

    One pass over the two memory-mapped tensors, a chunk of rows at a time,
    each chunk's mapped pages dropped once used (they would otherwise count in
    the resident size until the layer is done: 2 × 90 MB for a 7B MLP layer
    in BF16). Within a chunk, a cache-sized block of rows of each input is
    widened into a reused buffer (exact; BF16 by a shift), and ΔW's rows are
    the difference of the two buffers: the same correctly rounded subtraction
    as on the stored values, at about half the cost of NumPy casting inside
    the subtraction. The sums of squares accumulate in float64 (see
    ``sum_of_squares``).

    With ``noise``, the same widened blocks give the bounds of the
    rounding-noise profile of every side stored on a BF16, F16 or F8 grid
    (row, column and total sums of the variance bounds, and their largest
    entry: no per-entry variance, no extra layer in memory) and the count of
    unchanged entries.

    Raises
    ------
    NumericalError
        If ΔW holds NaN or Inf.
    """
    rows, columns = layer.shape
    base = stored_matrix(read_tensor_view(layer.base), layer)
    tuned = stored_matrix(read_tensor_view(layer.tuned), layer)
    wide = np.float64 if "F64" in (layer.base.dtype, layer.tuned.dtype) else np.float32
    delta = np.empty(layer.shape, dtype=wide)
    sides = rounded_sides(base, layer.base.dtype, tuned, layer.tuned.dtype) if noise else None
    profile = _ProfileSums(layer.shape, sides) if sides else None
    blocks = _Blocks(columns, wide)
    step = max(1, FORM_CHUNK_BYTES // max(columns * max(base.itemsize, tuned.itemsize), 1))
    base_energy = 0.0
    for start in range(0, rows, step):
        chunk = slice(start, min(start + step, rows))
        for block in blocks.rows(chunk):
            old, new = blocks.widen(base[block], tuned[block])
            np.subtract(new, old, out=delta[block])
            base_energy += sum_of_squares(old)
            if profile is not None:
                profile.add(old, new)
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
            matrix = stored_matrix(stored, layer)
            step = max(1, FORM_CHUNK_BYTES // max(layer.shape[1] * matrix.itemsize, 1))
            for start in range(0, layer.shape[0], step):
                chunk = slice(start, start + step)
                variance[chunk] += rounding_variance(matrix[chunk], grid)
                forget_pages(matrix[chunk])
    return variance


def rounded_sides(
    base: np.ndarray, base_dtype: str, tuned: np.ndarray, tuned_dtype: str
) -> tuple[str, str] | None:
    """Name the grids of base and tuned when one rounds and both have a model, else None."""
    grids = (storage_grid(base, base_dtype), storage_grid(tuned, tuned_dtype))
    if not any(grid in ROUNDING_GRIDS for grid in grids) or not all(g in GRIDS for g in grids):
        return None
    return grids


def side_scales(grids: tuple[str, str]) -> list[tuple[float, float] | None]:
    """Return each side's (x² factor, smallest variance); None for a side not rounded."""
    return [
        (square_scale(grid), smallest_variance(grid)) if grid in ROUNDING_GRIDS else None
        for grid in grids
    ]


class _Blocks:
    """Two reused buffers into which blocks of rows of base and tuned are widened.

    A block is ``PROFILE_BLOCK_ELEMENTS`` entries (256 kB of float32), so both
    stay in cache while ΔW's rows and the profile's sums are made from them.
    """

    def __init__(self, columns: int, dtype: type[np.floating]) -> None:
        self.height = max(1, PROFILE_BLOCK_ELEMENTS // max(columns, 1))
        self.old = np.empty((self.height, columns), dtype=dtype)
        self.new = np.empty((self.height, columns), dtype=dtype)

    def rows(self, chunk: slice) -> Iterator[slice]:
        """Split a chunk of rows into blocks."""
        for start in range(chunk.start, chunk.stop, self.height):
            yield slice(start, min(start + self.height, chunk.stop))

    def widen(self, base: np.ndarray, tuned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Widen a block of rows of each input; return the two buffers' views (base, tuned)."""
        height = base.shape[0]
        old, new = self.old[:height], self.new[:height]
        _widen(base, old)
        _widen(tuned, new)
        return old, new


class _ProfileSums:
    """Row, column and total sums of the variance bounds, and their largest entry, by blocks.

    Each rounded side's entry adds x²·4^(−p)/12 (its grid's
    :func:`square_scale`) plus its smallest variance. The squares are taken in
    the widened blocks :func:`form_on_host` made ΔW from (overwriting them),
    the two sides' added entry by entry, and the block's row and column sums
    taken by NumPy (float32; totals in float64; no BLAS, whose threads this
    reader thread would wake against the engine's), so the pass costs under
    a nanosecond per entry and side (0.7-0.9 ns measured, one thread).
    """

    def __init__(self, shape: tuple[int, int], grids: tuple[str, str]) -> None:
        self.scales = side_scales(grids)
        self.smallest = sum(scale[1] for scale in self.scales if scale is not None)
        self.columns = np.zeros(shape[1])
        self.row_max = self.energy = self.entry_max = 0.0
        self.changed = 0
        self.size = shape[0] * shape[1]
        height = max(1, PROFILE_BLOCK_ELEMENTS // max(shape[1], 1))
        self.unequal = np.empty((height, shape[1]), dtype=bool)

    def add(self, old: np.ndarray, new: np.ndarray) -> None:
        """Add one block of rows, base's and tuned's values widened (both are overwritten)."""
        height, width = old.shape
        self.changed += int(np.count_nonzero(np.not_equal(new, old, out=self.unequal[:height])))
        squares, factor = self._squares(old, new)
        rows = factor * squares.sum(axis=1).astype(np.float64) + self.smallest * width
        self.columns += factor * squares.sum(axis=0) + self.smallest * height
        self.row_max = max(self.row_max, float(rows.max(initial=0.0)))
        self.energy += float(rows.sum())
        peak = factor * float(squares.max(initial=0.0)) + self.smallest
        self.entry_max = max(self.entry_max, peak)

    def _squares(self, old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, float]:
        """Return Σ over rounded sides of c·x² per entry as (block, factor c outside it)."""
        rounded = [
            (scale[0], values)
            for scale, values in zip(self.scales, (old, new), strict=True)
            if scale is not None
        ]
        for _, values in rounded:
            np.square(values, out=values)
        if len(rounded) == 1:
            factor, squares = rounded[0]
            return squares, factor
        (first, old_squares), (second, new_squares) = rounded
        if first != second:
            old_squares *= first / second
        old_squares += new_squares
        return old_squares, second

    def rounding(self, grids: tuple[str, str]) -> Rounding:
        """Make the layer's Rounding once every block is in."""
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
    """Widen stored values into a float32 (or float64) buffer of their shape, exactly.

    BF16 is the top half of a float32 word, so a shift widens it (about 3.5×
    faster here than ml_dtypes' cast, which the other dtypes use).
    """
    if stored.dtype == DTYPES["BF16"] and out.dtype == np.float32:
        words = out.view(np.uint32)
        np.copyto(words, stored.view(np.uint16), casting="unsafe")
        np.left_shift(words, 16, out=words)
    else:
        np.copyto(out, stored, casting="unsafe")


def stored_matrix(stored: np.ndarray, layer: Layer) -> np.ndarray:
    """View a stored tensor as the layer's matrix: one expert of a fused tensor, or reshaped."""
    if layer.part is not None:
        stored = stored[layer.part]
    return stored.reshape(layer.shape)
