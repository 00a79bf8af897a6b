"""Resizing a LoRA adapter: each module's s·B·A re-factored at a new rank from its r×r core.

With B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), s·B·A = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ; the
SVD of the r×r core C = Ũ·Σ·Ṽᵀ gives the singular triplets of the update,
U = Q_B·Ũ and V = Q_A·Ṽ, exactly and without the m×n product. The error of the
new factors is measured the same way: s·B·A − s'·B'·A' = [s·B, −s'·B']·[A; A'],
whose Frobenius norm is that of the 2r×2r product of the two thin R factors.
Everything runs in float64: O((m + n)·r²) flops per module.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from svdrank.analysis.extract import Factored, store
from svdrank.spectra.factors import TruncatedSvd


def core_svd(b: np.ndarray, a: np.ndarray, scale: float) -> TruncatedSvd:
    """Return every singular triplet of scale·B·A (min(m, n, r) of them) from its r×r core.

    Parameters
    ----------
    b : ndarray, shape (m, r)
    a : ndarray, shape (r, n)
    scale : float
        The adapter's s = α/r (α/√r with rsLoRA).

    Returns
    -------
    TruncatedSvd
        float64 vectors, ``method="core"``.
    """
    q_b, r_b = scipy.linalg.qr(np.asarray(b, dtype=np.float64), mode="economic")
    q_a, r_a = scipy.linalg.qr(np.asarray(a, dtype=np.float64).T, mode="economic")
    u, values, vt = scipy.linalg.svd(scale * (r_b @ r_a.T), full_matrices=False)
    return TruncatedSvd(q_b @ u, values, vt @ q_a.T, "core")


def low_rank_energy(left: np.ndarray, right: np.ndarray) -> float:
    """‖left·right‖_F² from the thin R factors of both sides, in float64 (no m×n product)."""
    # SciPy's mode="r" pads R with zero rows: keep the thin part.
    r_left = scipy.linalg.qr(np.asarray(left, dtype=np.float64), mode="r")[0][: min(left.shape)]
    r_right = scipy.linalg.qr(np.asarray(right, dtype=np.float64).T, mode="r")[0]
    core = r_left @ r_right[: min(right.shape)].T
    return float(np.sum(np.square(core)))


def refactor_module(
    b: np.ndarray,
    a: np.ndarray,
    scale: float,
    rank: int,
    new_scale: float,
    dtype: str,
    name: str,
) -> Factored:
    """Re-factor one module's update s·B·A at ``rank``, stored in ``dtype`` with scale s'.

    Returns
    -------
    Factored
        New B' (m × rank) and A' (rank × n) with s'·B'·A' the best rank-``rank``
        approximation of s·B·A (before the cast), and the error of the stored
        factors, exact.
    """
    whole = core_svd(b, a, scale)
    tail = float(np.sum(np.square(whole.values[rank:])))
    svd = TruncatedSvd(whole.left[:, :rank], whole.values[:rank], whole.right[:rank], "core", tail)

    def residual(new_b: np.ndarray, new_a: np.ndarray) -> float:
        left = np.hstack([scale * np.asarray(b, np.float64), -new_scale * new_b.astype(np.float64)])
        right = np.vstack([np.asarray(a, np.float64), new_a.astype(np.float64)])
        return low_rank_energy(left, right)

    return store(svd, None, whole.kept_energy, tail, new_scale, dtype, name, residual)
