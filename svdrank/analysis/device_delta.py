"""Forming ΔW on a torch device: the stored bytes go over, the widening happens there.

The torch kernels (``--device cuda``, or ``torch-cpu``) decompose ΔW where
they run; forming it there too means the host copies only the layer's stored
bytes (2 per entry for BF16 and F16, 1 for F8) instead of a float32 ΔW (4).
Each chunk of rows of both inputs is copied as raw words into a small
writable host buffer (a read-only memory map cannot back a tensor), moved to
the device, viewed there in its stored dtype and widened, and subtracted
into ΔW, preallocated on the device. The sums :func:`form_on_host` makes on
the host are made on the device from the same widened chunks, in float64.

Widening BF16, F16 and F8 to float32 is exact, and so is each side's
subtraction in float32 the same correctly rounded operation as NumPy's: ΔW
is the host's, bit for bit. The sums differ from the host's by summation
order only (and the host rounds more: see :func:`form_on_device`).

This module imports torch: :func:`svdrank.analysis.delta.form_delta` imports
it only for torch kernels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from svdrank.analysis.delta import (
    FORM_CHUNK_BYTES,
    FormedDelta,
    Rounding,
    form_on_host,
    rounded_sides,
    side_scales,
    stored_matrix,
)
from svdrank.inputs.checkpoint import forget_pages, read_tensor_view
from svdrank.spectra.devices import Kernels
from svdrank.spectra.kernels import require_finite
from svdrank.spectra.noise import ProfileBounds
from svdrank.spectra.torch_kernels import TorchKernels
from svdrank.types import Layer

STORED: dict[str, tuple[type[np.generic], torch.dtype]] = {
    "F64": (np.float64, torch.float64),
    "F32": (np.float32, torch.float32),
    "F16": (np.int16, torch.float16),
    "BF16": (np.int16, torch.bfloat16),
    "F8_E4M3": (np.uint8, torch.float8_e4m3fn),
    "F8_E5M2": (np.uint8, torch.float8_e5m2),
}
"""How a stored dtype travels to the device (the NumPy words its bytes are copied as) and
what torch dtype those words are viewed as there. Other dtypes are formed on the host."""


def form_on_device(layer: Layer, noise: bool, kernels: Kernels) -> FormedDelta:
    """ΔW formed on the kernels' torch device, with the sums :func:`form_on_host` makes.

    One pass over the two memory-mapped tensors, a chunk of rows at a time
    (as :func:`form_on_host`): each chunk's stored bytes are copied to the
    device, widened there to float32 (float64 when an input is F64) and
    subtracted into ΔW. ‖ΔW‖_F², ‖W_base‖_F² and, with ``noise``, the
    rounding-noise profile sums accumulate on the device in float64, from
    squares taken in float64 (exact), so they are within float64 rounding of
    the exact sums; the host's are within 2⁻²⁴ (its dot product and block
    sums round in float32). The grids are read on the host, as
    :func:`form_on_host` reads them. Device memory: ΔW plus a few chunks.

    Parameters
    ----------
    layer : Layer
    noise : bool
        Also bound the rounding-noise profile and count the unchanged entries.
    kernels : Kernels
        Torch kernels (:class:`svdrank.spectra.torch_kernels.TorchKernels`): ΔW
        is formed on their ``torch_device``.

    Returns
    -------
    FormedDelta
        Its ``delta`` a tensor on the device; an ndarray formed on the host
        by :func:`form_on_host` for kernels that are not torch's, a dtype
        without an entry in :data:`STORED`, or a layer without entries.

    Raises
    ------
    NumericalError
        If ΔW holds NaN or Inf.
    """
    if not isinstance(kernels, TorchKernels) or not _travels(layer):
        return form_on_host(layer, noise)
    device = kernels.torch_device
    base = stored_matrix(read_tensor_view(layer.base), layer)
    tuned = stored_matrix(read_tensor_view(layer.tuned), layer)
    wide = torch.float64 if "F64" in (layer.base.dtype, layer.tuned.dtype) else torch.float32
    delta = torch.empty(layer.shape, dtype=wide, device=device)
    sides = rounded_sides(base, layer.base.dtype, tuned, layer.tuned.dtype) if noise else None
    profile = _DeviceProfile(layer.shape, sides, device) if sides else None
    step = max(1, FORM_CHUNK_BYTES // max(layer.shape[1] * max(base.itemsize, tuned.itemsize), 1))
    senders = (
        _Sender(base, layer.base.dtype, device, step),
        _Sender(tuned, layer.tuned.dtype, device, step),
    )
    energy = torch.zeros((), dtype=torch.float64, device=device)
    base_energy = torch.zeros_like(energy)
    for start in range(0, layer.shape[0], step):
        rows = slice(start, start + step)
        base_rows, tuned_rows = (sender.widened(rows, wide) for sender in senders)
        torch.sub(tuned_rows, base_rows, out=delta[rows])
        energy += _sum_of_squares(delta[rows])
        base_energy += _sum_of_squares(base_rows)
        if profile is not None:
            profile.add(delta[rows], base_rows, tuned_rows)
    total = require_finite(float(energy), layer.name)
    rounding = None if profile is None or sides is None else profile.rounding(sides)
    return FormedDelta(delta, total, math.sqrt(float(base_energy)), rounding)


def _travels(layer: Layer) -> bool:
    """Whether the layer can be formed on the device: both dtypes known, some entries."""
    known = layer.base.dtype in STORED and layer.tuned.dtype in STORED
    return known and math.prod(layer.shape) > 0


def to_device(words: np.ndarray, device: torch.device) -> torch.Tensor:
    """Move a chunk of stored words to the device as they are: the one copy to it."""
    return torch.from_numpy(words).to(device)


class _Sender:
    """Sends one input's rows to the device, through one reused writable host buffer."""

    def __init__(self, stored: np.ndarray, dtype: str, device: torch.device, step: int) -> None:
        self.words_type, self.stored_type = STORED[dtype]
        self.stored = stored
        self.device = device
        self.buffer = np.empty((min(step, stored.shape[0]), stored.shape[1]), self.words_type)

    def widened(self, rows: slice, wide: torch.dtype) -> torch.Tensor:
        """Return the rows widened to ``wide`` on the device (their mapped pages dropped)."""
        stored = self.stored[rows]
        words = self.buffer[: stored.shape[0]]
        np.copyto(words, stored.view(self.words_type))
        forget_pages(stored)
        return to_device(words, self.device).view(self.stored_type).to(wide)


def _sum_of_squares(values: torch.Tensor) -> torch.Tensor:
    """Σ x² over a chunk: squares and sum in float64 (exact squares of float32 values)."""
    wide = values.reshape(-1).to(torch.float64)
    return torch.dot(wide, wide)


class _DeviceProfile:
    """The sums of :class:`svdrank.analysis.delta._ProfileSums`, on the device, in float64.

    Each rounded side adds x²·4^(−p)/12 plus its smallest variance to each
    entry's variance bound; the bounds' row, column and total sums and their
    largest entry are taken from the squares in float64 (exact). Nothing
    comes back to the host until :meth:`rounding`.
    """

    def __init__(self, shape: tuple[int, int], grids: tuple[str, str], device: torch.device):
        self.scales = side_scales(grids)
        self.smallest = sum(scale[1] for scale in self.scales if scale is not None)
        self.size = shape[0] * shape[1]
        self.columns = torch.zeros(shape[1], dtype=torch.float64, device=device)
        self.row_max = torch.zeros((), dtype=torch.float64, device=device)
        self.energy = torch.zeros_like(self.row_max)
        self.entry_max = torch.zeros_like(self.row_max)
        self.changed = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, delta: torch.Tensor, *sides: torch.Tensor) -> None:
        """Add one chunk of rows: ΔW's chunk, then the base's and the tuned's (widened)."""
        self.changed += torch.count_nonzero(delta)
        bounds = torch.full(delta.shape, self.smallest, dtype=torch.float64, device=delta.device)
        for scale, side in zip(self.scales, sides, strict=True):
            if scale is not None:
                bounds += scale[0] * side.to(torch.float64).square_()
        rows = bounds.sum(dim=1)
        self.columns += bounds.sum(dim=0)
        self.row_max = torch.maximum(self.row_max, rows.max())
        self.energy += rows.sum()
        self.entry_max = torch.maximum(self.entry_max, bounds.max())

    def rounding(self, grids: tuple[str, str]) -> Rounding:
        """Bring the sums back and make the layer's Rounding once every chunk is in."""
        bounds = ProfileBounds(
            float(self.energy),
            float(self.row_max),
            float(self.columns.max()),
            float(self.entry_max),
            sum(scale is not None for scale in self.scales),
        )
        return Rounding(grids, bounds, self.size - int(self.changed))
