"""Where the spectra are computed: one set of kernels per device, chosen in one place.

:func:`svdrank.spectra.engines.decompose` decides everything (which engine, how
far a sketch grows, when to hand over to a complete engine) and calls the
heavy steps through a :class:`Kernels` object: :data:`HOST` runs them with
NumPy and SciPy's LAPACK (:mod:`svdrank.spectra.kernels`), the torch kernels
(:mod:`svdrank.spectra.torch_kernels`, imported only when chosen) on a torch
device. The analysis calls :func:`kernels_for` once per run and hands the
result down; nothing else branches on the device.

Every kernel returns singular values as a host NumPy array (a vector: cheap to
bring back), so the engines' decisions and energy sums run on the host in
float64 whatever the device. The random sketches are drawn by the host's
``numpy.random.Generator`` and copied to the device, so a seed gives the same
sketch everywhere.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol

import numpy as np

from svdrank.errors import UsageError
from svdrank.spectra import kernels
from svdrank.types import DEVICES, check_choice

GPU_EXTRA = "pip install 'svdrank[gpu]'"
"""How to get torch for ``--device cuda``."""


class Kernels(Protocol):
    """The heavy steps of the engines, on one device.

    A *matrix* is whatever :meth:`place` returns (an ndarray on the host, a
    tensor on a torch device); ``.shape`` and ``.T`` work on it. Values come
    back as host ndarrays in the matrix's dtype, descending.
    """

    device: str
    """The device's name, as ``--device`` resolved it."""

    def place(self, delta: Any) -> Any:
        """Return ΔW on the device (no copy where it already is: formed there, say)."""

    def exact_values(self, matrix: Any) -> np.ndarray:
        """Return every singular value (an SVD, values only)."""

    def smaller_gram(self, matrix: Any) -> Any:
        """Return ΔWᵀΔW or ΔWΔWᵀ, whichever is smaller (at least its lower triangle)."""

    def gram_spectrum(self, gram: Any) -> np.ndarray:
        """Return σᵢ = √λᵢ of a Gram matrix from :meth:`smaller_gram` (which may be overwritten)."""

    def empty_basis(self, matrix: Any) -> Any:
        """Return a basis of no columns for the range of ``matrix``."""

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
        """Grow an orthonormal basis of the range (see :func:`kernels.extend_range`)."""

    def projected_values(
        self, matrix: Any, basis: Any, *, symmetric: bool = False
    ) -> np.ndarray:
        """Return the singular values of QᵀΔW (see :func:`kernels.projected_values`)."""

    def lanczos_values(
        self, matrix: Any, k: int, solver: str, rng: np.random.Generator
    ) -> np.ndarray:
        """Return the top-k values by SciPy's Krylov solvers (:func:`kernels.lanczos_values`)."""


class HostKernels:
    """NumPy and SciPy's LAPACK on the host's CPUs: the engines' default kernels."""

    device = "cpu"
    exact_values = staticmethod(kernels.exact_values)
    smaller_gram = staticmethod(kernels.smaller_gram)
    gram_spectrum = staticmethod(kernels.gram_spectrum)
    extend_range = staticmethod(kernels.extend_range)
    projected_values = staticmethod(kernels.projected_values)
    lanczos_values = staticmethod(kernels.lanczos_values)

    @staticmethod
    def place(delta: np.ndarray) -> np.ndarray:
        """Return ΔW itself: it is already on the host."""
        return delta

    @staticmethod
    def empty_basis(matrix: np.ndarray) -> np.ndarray:
        """Return an m×0 array of the matrix's dtype."""
        return np.empty((matrix.shape[0], 0), dtype=matrix.dtype)


HOST: Kernels = HostKernels()
"""The kernels of ``--device cpu``."""


def kernels_for(device: str) -> Kernels:
    """Return the kernels of a ``--device`` choice: the one place the device is decided.

    Parameters
    ----------
    device : {"cpu", "cuda", "auto", "torch-cpu"}
        ``cpu``: NumPy and SciPy (:data:`HOST`). ``cuda``: torch on the current
        CUDA device. ``auto``: cuda when torch is installed and sees a CUDA
        device, else cpu. ``torch-cpu``: the torch kernels on torch's CPU device.

    Returns
    -------
    Kernels

    Raises
    ------
    UsageError
        For an unknown choice, for ``cuda`` or ``torch-cpu`` without torch, and
        for ``cuda`` when torch sees no CUDA device.
    """
    check_choice(device, DEVICES, "device")
    if device == "cpu" or (device == "auto" and not _torch_installed()):
        return HOST
    if not _torch_installed():
        raise UsageError(f"--device {device} needs torch: {GPU_EXTRA}")
    from svdrank.spectra.torch_kernels import TorchKernels, cuda_available

    if device == "torch-cpu":
        return TorchKernels("cpu")
    if cuda_available():
        return TorchKernels("cuda")
    if device == "auto":
        return HOST
    raise UsageError("--device cuda: torch sees no CUDA device; use --device cpu or auto")


def _torch_installed() -> bool:
    """Whether torch can be imported (without importing it: that takes a second)."""
    return importlib.util.find_spec("torch") is not None
