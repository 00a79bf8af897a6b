"""The engines' kernels in torch, for a CUDA GPU (or torch's CPU device, as the tests run them).

The same algorithms as :mod:`svdrank.spectra.kernels`, step for step: the
Gram matrix and a symmetric values-only eigensolver (``torch.linalg.eigvalsh``),
an SVD's values (``torch.linalg.svdvals``), and the randomized range finder
with LU or QR normalisation between power iterations. The Gaussian sketch is
drawn on the host by the caller's ``numpy.random.Generator`` and copied to the
device, so a seed gives the same sketch as the NumPy kernels: the values then
differ by rounding only (float32: a few ε·σ₁), and so do the ranks read from
them only where an energy sum falls within that rounding of a target.

ΔW arrives here already on the device: the analysis copies each layer's
stored bytes there (BF16 and F16 as 16-bit words, F8 as bytes) and widens and
subtracts them there (:mod:`svdrank.analysis.device_delta`), so :meth:`place`
returns it as it is; an ndarray (a ΔW formed on the host) is copied over
whole. The storage-noise floor's full estimate
(:mod:`svdrank.spectra.noise`) runs on the host, from a copy of ΔW brought
back for the layers that need it.

This module imports torch: :func:`svdrank.spectra.devices.kernels_for`
imports it only when a torch device is chosen.
"""

from __future__ import annotations

import numpy as np
import torch

from svdrank.spectra import kernels


def cuda_available() -> bool:
    """Whether torch sees a CUDA device."""
    return torch.cuda.is_available()


class TorchKernels:
    """The heavy steps of the engines on one torch device (see :class:`devices.Kernels`).

    Parameters
    ----------
    device : {"cpu", "cuda"}
        torch's device; ``cuda`` is the current CUDA device (choose one with
        ``CUDA_VISIBLE_DEVICES``).
    """

    def __init__(self, device: str) -> None:
        self.device = "torch-cpu" if device == "cpu" else device
        self.torch_device = torch.device(device)

    def place(self, delta: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Return ΔW as a tensor on the device: as it is when it is one there already.

        An ndarray is copied over (its memory shared on ``cpu``).
        """
        if isinstance(delta, torch.Tensor):
            return delta.to(self.torch_device)
        return torch.from_numpy(delta).to(self.torch_device)

    def exact_values(self, matrix: torch.Tensor) -> np.ndarray:
        """Return every singular value by ``torch.linalg.svdvals`` (accuracy as gesdd)."""
        return _host(torch.linalg.svdvals(matrix))

    def smaller_gram(self, matrix: torch.Tensor) -> torch.Tensor:
        """Return ΔWᵀΔW or ΔWΔWᵀ, whichever is smaller, whole (one product: m·n² flops)."""
        if matrix.shape[0] >= matrix.shape[1]:
            return matrix.mT @ matrix
        return matrix @ matrix.mT

    def gram_spectrum(self, gram: torch.Tensor) -> np.ndarray:
        """Return σᵢ = √λᵢ, descending, by ``torch.linalg.eigvalsh`` (error O(ε·σ₁²) on λᵢ)."""
        eigenvalues = torch.linalg.eigvalsh(gram)
        return _host(torch.sqrt(torch.clamp(eigenvalues.flip(0), min=0.0)))

    def empty_basis(self, matrix: torch.Tensor) -> torch.Tensor:
        """Return an m×0 tensor of the matrix's dtype, on the device."""
        return matrix.new_empty((matrix.shape[0], 0))

    def extend_range(
        self,
        matrix: torch.Tensor,
        basis: torch.Tensor,
        width: int,
        power_iters: int,
        normalizer: str,
        rng: np.random.Generator,
        *,
        krylov: bool = False,
        symmetric: bool = False,
    ) -> torch.Tensor:
        """Grow an orthonormal basis of the range, as :func:`kernels.extend_range` does.

        The Gram matrix is whole here, so ``symmetric`` needs no special product.
        With ``krylov`` every normalised iterate is kept (randomized block Krylov).
        Cost: 2·power_iters + 1 products with an n×width block.
        """
        drawn = rng.standard_normal((matrix.shape[1], width), dtype=_numpy_dtype(matrix))
        sketch = torch.from_numpy(drawn).to(self.torch_device)
        block = _project_out(matrix @ sketch, basis)
        iterates = []
        for _ in range(power_iters):
            block = _normalize(block, normalizer)
            if krylov:
                iterates.append(block)
            block = _normalize(matrix.mT @ block, normalizer)
            block = _project_out(matrix @ block, basis)
        iterates.append(block)
        fresh = torch.linalg.qr(torch.cat(iterates, dim=1)).Q
        if basis.shape[1]:
            # Re-orthogonalise against the old basis: one projection loses orthogonality.
            fresh = torch.linalg.qr(_project_out(fresh, basis)).Q
        return torch.cat([basis, fresh], dim=1)

    def projected_values(
        self, matrix: torch.Tensor, basis: torch.Tensor, *, symmetric: bool = False
    ) -> np.ndarray:
        """Return the singular values of QᵀΔW (each ≤ the matching σᵢ), from ΔWᵀQ."""
        return self.exact_values(matrix.mT @ basis)

    def lanczos_values(
        self, matrix: torch.Tensor, k: int, solver: str, rng: np.random.Generator
    ) -> np.ndarray:
        """Return the top-k values by SciPy's ARPACK or PROPACK: on the host, from a copy."""
        return kernels.lanczos_values(matrix.cpu().numpy(), k, solver, rng)


def _host(values: torch.Tensor) -> np.ndarray:
    """Bring a vector of values back to the host as NumPy."""
    return values.cpu().numpy()


def _numpy_dtype(matrix: torch.Tensor) -> type[np.floating]:
    """Return the NumPy dtype in which the host draws a sketch for ``matrix``."""
    return np.float64 if matrix.dtype == torch.float64 else np.float32


def _project_out(block: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove the components of ``block`` that lie in the span of ``basis``."""
    if basis.shape[1] == 0:
        return block
    return block - basis @ (basis.mT @ block)


def _normalize(block: torch.Tensor, normalizer: str) -> torch.Tensor:
    """Keep a sketch block well conditioned between power iterations (same span)."""
    if normalizer == "lu":
        return _permuted_lower(block)
    if normalizer == "qr":
        return torch.linalg.qr(block).Q
    return block


def _permuted_lower(block: torch.Tensor) -> torch.Tensor:
    """P·L of block = P·L·U (SciPy's ``lu(permute_l=True)``), without forming the m×m P.

    LAPACK's pivots are row swaps applied in turn; replayed on the row indices
    (w swaps, on the host) they give the rows of L that make up P·L.
    """
    factors, pivots = torch.linalg.lu_factor(block)
    lower = torch.tril(factors[:, : min(block.shape)], diagonal=-1)
    lower.diagonal().fill_(1.0)
    order = np.arange(block.shape[0])
    for row, swap in enumerate(pivots.cpu().numpy() - 1):
        order[row], order[swap] = order[swap], order[row]
    inverse = torch.from_numpy(np.argsort(order)).to(block.device)
    return lower[inverse]
