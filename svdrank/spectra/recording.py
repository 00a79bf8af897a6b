"""Host kernels that keep what the engine computed for one layer, for its factors to reuse.

Extraction in one pass decomposes a layer exactly as ``diff`` does and then
needs the top singular vectors of the same ΔW. The engine's heavy steps go
through a :class:`~svdrank.spectra.devices.Kernels` object, so handing
:func:`svdrank.spectra.engines.decompose` a :class:`RecordingKernels` keeps
those steps' results without changing a single decision or number:

- a complete Gram spectrum's eigenvalues come from the tridiagonal reduction
  syevr would make, reduced the same way (bit for bit, see
  :mod:`svdrank.spectra.tridiagonal`), and the reduction is kept;
- a truncated spectrum's last sketch basis is kept, with ΔW's projection on
  it when the engine formed that projection.

The engine calls ``gram_spectrum`` only on ΔW's own Gram matrix, and its last
``extend_range`` builds the basis whose projection gave the values returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from svdrank.spectra import kernels
from svdrank.spectra.devices import HOST
from svdrank.spectra.factors import Sketch
from svdrank.spectra.tridiagonal import (
    Tridiagonal,
    syevr_scales,
    tridiagonal_eigenvalues,
    tridiagonalize,
)


@dataclass(frozen=True)
class Workings:
    """What the engine computed for one layer that its top singular vectors can reuse.

    Attributes
    ----------
    reduction : Tridiagonal or None
        The tridiagonal reduction of ΔW's smaller Gram matrix (complete Gram spectra).
    sketch : Sketch or None
        The last range-finder basis (truncated spectra; Gram-first sketches too).
    """

    reduction: Tridiagonal | None = None
    sketch: Sketch | None = None


class RecordingKernels:
    """The host's NumPy and SciPy kernels, keeping what one layer's decomposition computed.

    A :class:`~svdrank.spectra.devices.Kernels` with the numbers of
    :data:`~svdrank.spectra.devices.HOST`. Use one object per layer:
    :attr:`workings` describes the last ΔW placed.
    """

    device = "cpu"
    exact_values = staticmethod(kernels.exact_values)
    smaller_gram = staticmethod(kernels.smaller_gram)
    lanczos_values = staticmethod(kernels.lanczos_values)
    empty_basis = staticmethod(HOST.empty_basis)

    def __init__(self) -> None:
        self._shape: tuple[int, int] = (0, 0)
        self._reduction: Tridiagonal | None = None
        self._sketch: Sketch | None = None

    @property
    def workings(self) -> Workings:
        """The reduction and the sketch kept from the layer's decomposition."""
        return Workings(self._reduction, self._sketch)

    def take_workings(self) -> Workings:
        """Return :attr:`workings` and forget them here, so they leave memory with the caller's."""
        workings = self.workings
        self._reduction = self._sketch = None
        return workings

    def place(self, delta: np.ndarray) -> np.ndarray:
        """Return ΔW itself, noting its shape (the sides of the sketches follow from it)."""
        self._shape = delta.shape
        return delta

    def gram_spectrum(self, gram: np.ndarray) -> np.ndarray:
        """Return σᵢ = √λᵢ as :func:`kernels.gram_spectrum` does, keeping the reduction.

        A Gram matrix syevr would rescale first (its entries beyond ~1e9 or
        below ~1e-15 in float32) goes to syevr itself and nothing is kept.
        """
        if gram.dtype not in (np.float32, np.float64) or syevr_scales(gram):
            return kernels.gram_spectrum(gram)
        self._reduction = tridiagonalize(gram)
        return kernels.gram_singular_values(tridiagonal_eigenvalues(self._reduction))

    def extend_range(
        self,
        matrix: Any,
        basis: Any,
        width: int,
        power_iters: int,
        normalizer: str,
        rng: np.random.Generator,
        *,
        krylov: bool = False,
        symmetric: bool = False,
    ) -> Any:
        """Grow the basis as :func:`kernels.extend_range` does, keeping it as the layer's sketch."""
        grown = kernels.extend_range(
            matrix, basis, width, power_iters, normalizer, rng, krylov, symmetric
        )
        tall = self._shape[0] >= self._shape[1]
        # ΔW is sketched on its longer side; its Gram matrix ΔWᵀΔW (tall) spans the row space.
        self._sketch = Sketch(grown, left=tall != symmetric)
        return grown

    def projected_values(self, matrix: Any, basis: Any, *, symmetric: bool = False) -> np.ndarray:
        """Return QᵀΔW's values as :func:`kernels.projected_values` does, keeping the projection."""
        projection = kernels.times(matrix, basis, transpose=True, symmetric=symmetric)
        sketch = self._sketch
        if not symmetric and sketch is not None and sketch.basis is basis:
            self._sketch = Sketch(sketch.basis, sketch.left, projection)
        return kernels.exact_values(projection)
