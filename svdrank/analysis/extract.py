"""Extraction's numerics: every chosen layer's update split into LoRA factors, one at a time.

Each layer's ΔW is formed again from the memory-mapped checkpoints (as
``diff`` forms it), its top-r singular triplets are computed
(:mod:`svdrank.spectra.factors`), split into balanced factors, cast to the
storage dtype, and the error ‖ΔW − s·B·A‖_F of the factors *as stored* is
measured on the spot. The next layer is read while the current one is
factored, so at most two layers' updates are in memory: ``diff``'s bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from svdrank.analysis.delta import FormedDelta, form_delta, layer_bytes
from svdrank.errors import NumericalError, UsageError
from svdrank.inputs.checkpoint import DTYPES
from svdrank.spectra.factors import (
    RESIDUAL_CHUNK_BYTES,
    TruncatedSvd,
    exact_svd,
    lora_factors,
    projected_residual_energy,
    relative_error,
    residual_energy,
    sketch_svd,
    truncated_svd,
    vectors_svd,
)
from svdrank.spectra.recording import Workings
from svdrank.spectra.tridiagonal import top_eigenvectors
from svdrank.types import (
    ADAPTER_DTYPES,
    NORMALIZERS,
    Layer,
    LayerResult,
    Progress,
    ProgressUpdate,
    check_choice,
)

STORED_AS = {"BF16": "bf16", "F16": "fp16"}
"""A tuned checkpoint's dtype → the adapter's default dtype (fp32 for every other)."""
NEAR_OPTIMAL = 1.01
"""A sketched approximation whose error exceeds the best known by more is recomputed exactly."""


@dataclass(frozen=True)
class FactorSettings:
    """How the factors are computed and stored.

    Parameters
    ----------
    dtype : {"BF16", "F16", "F32"}
        The safetensors dtype of the stored factors.
    oversample, power_iters, normalizer
        Settings of the randomized SVD (see :func:`svdrank.spectra.factors.randomized_svd`).
    seed : int
        The sketch of the analysis's layer i is seeded with ``[seed, i]``.
    """

    dtype: str = "F32"
    oversample: int = 10
    power_iters: int = 2
    normalizer: str = "lu"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.dtype, tuple(ADAPTER_DTYPES.values()), "adapter dtype")
        check_choice(self.normalizer, NORMALIZERS, "normalizer")
        if self.oversample < 0 or self.power_iters < 0 or self.seed < 0:
            raise UsageError("--oversample, --power-iters and --seed must be ≥ 0")


@dataclass(frozen=True)
class FactorJob:
    """One layer to factor: where to read it, its analysis, rank r, LoRA scale s, its index.

    ``index`` is the layer's place in the analysis: its sketch is seeded with
    ``[seed, index]``, so a layer's factors do not depend on which others are adapted.
    """

    layer: Layer
    result: LayerResult
    rank: int
    scale: float
    index: int

    @property
    def known_energy(self) -> float:
        """Σ_{i≤r} σᵢ² from the analysis's values: at most the best rank-r energy."""
        return float(np.sum(np.square(self.result.spectrum.values[: self.rank])))

    @property
    def known_tail(self) -> float | None:
        """Σ_{i>r} σᵢ² when the analysis's spectrum is complete, else None."""
        spectrum = self.result.spectrum
        if not spectrum.complete:
            return None
        return float(np.sum(np.square(spectrum.values[self.rank :])))


@dataclass(frozen=True)
class FactorQuality:
    """How well a layer's stored factors reproduce its update.

    ``energy`` is Σ_{i≤r} σ̂ᵢ²/‖ΔW‖² of the approximation; ``error`` the relative
    error of the stored factors; ``optimal`` √(1 − E(r)) from the best values
    known; ``method`` how the vectors were computed; ``underflows`` the factor
    entries below the storage dtype's normal range.
    """

    energy: float
    error: float
    optimal: float
    method: str
    underflows: int


@dataclass(frozen=True)
class Factored:
    """A layer's LoRA factors as stored (ΔW ≈ s·B·A, the checkpoint's orientation) and quality."""

    b: np.ndarray
    a: np.ndarray
    quality: FactorQuality


def default_dtype(tuned_dtypes: Sequence[str]) -> str:
    """Return the ``--dtype`` choice that matches most of the tuned layers' dtypes."""
    counts: dict[str, int] = {}
    for dtype in tuned_dtypes:
        choice = STORED_AS.get(dtype, "fp32")
        counts[choice] = counts.get(choice, 0) + 1
    return max(sorted(counts), key=counts.__getitem__) if counts else "fp32"


def factor_layers(
    jobs: Sequence[FactorJob], settings: FactorSettings, progress: Progress | None = None
) -> Iterator[Factored]:
    """Factor every job's update, in order, reading the next layer while one is factored.

    Parameters
    ----------
    jobs : sequence of FactorJob
    settings : FactorSettings
    progress : callable, optional
        Told after each layer (bytes are those read from both checkpoints).

    Yields
    ------
    Factored
        One per job, in order.

    Raises
    ------
    NumericalError
        If ΔW holds NaN or Inf, or a factor overflows the storage dtype.
    """
    if not jobs:
        return
    total_bytes = sum(layer_bytes(job.layer) for job in jobs)
    done_bytes = 0
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="svdrank-read")
    try:
        next_read = reader.submit(form_delta, jobs[0].layer)
        for index, job in enumerate(jobs):
            formed = next_read.result()
            if index + 1 < len(jobs):
                next_read = reader.submit(form_delta, jobs[index + 1].layer)
            rng = np.random.default_rng([settings.seed, job.index])
            yield factor_update(formed, job, settings, rng)
            del formed
            done_bytes += layer_bytes(job.layer)
            if progress is not None:
                progress(ProgressUpdate(job.result, index + 1, len(jobs), done_bytes, total_bytes))
    finally:
        reader.shutdown(wait=False, cancel_futures=True)


def factor_update(
    formed: FormedDelta,
    job: FactorJob,
    settings: FactorSettings,
    rng: np.random.Generator,
    workings: Workings | None = None,
    reduced: Callable[[], None] | None = None,
) -> Factored:
    """Split one formed update into stored factors and measure their error.

    ``reduced`` is told once the engine's work is out of memory (the top
    eigenvectors taken from a Gram reduction, its peak): a reader may then
    form the next layer without the two peaks meeting.

    The top triplets come from what the analysis's engine computed for this
    ΔW when ``workings`` hold it (see :func:`reused_svd`), else from
    :func:`~svdrank.spectra.factors.truncated_svd`. A sketched or Gram SVD
    whose error before the cast exceeds the best known (√(1 − E(r)) from the
    larger of its own and the analysis's values) by more than 1 % is
    recomputed exactly, so the error reported is within 1 % of the optimum
    whenever the analysis's spectrum was exact.
    """
    delta, total = formed.delta, formed.total_energy
    reuse = None if workings is None else reused_svd(delta, job, workings, settings.oversample)
    del workings  # the engine's reduction leaves memory before the vectors' product is made
    if reduced is not None:
        reduced()
    svd = None if reuse is None else reuse()
    if svd is None:
        svd = truncated_svd(
            delta,
            job.rank,
            oversample=settings.oversample,
            power_iters=settings.power_iters,
            normalizer=settings.normalizer,
            rng=rng,
        )
    optimal = _optimal_energy(svd, job, total)
    if svd.method in ("randomized", "gram") and _excess(total, svd.kept_energy, optimal):
        svd = exact_svd(delta, job.rank)
        optimal = _optimal_energy(svd, job, total)
    cast = cast_factors(svd, job.scale, settings.dtype, job.layer.name, overwrite=True, total=total)
    del svd  # a residual formed from ΔW is the peak of memory: only ΔW and the stored factors stay
    return measure_stored(cast, delta, total, optimal, job.scale)


def reused_svd(
    delta: np.ndarray, job: FactorJob, workings: Workings, oversample: int
) -> Callable[[], TruncatedSvd] | None:
    """Plan the top triplets from the engine's own work on ΔW, or None where it kept none.

    A complete Gram spectrum left its tridiagonal reduction: the top r
    eigenvectors come from it now, without a second SYRK or reduction, and
    the plan holds them, not the reduction (which the caller can drop before
    the plan's m·n·r product). A truncated spectrum left its range finder's
    basis: when it is at least r + oversample wide, the small SVD of ΔW's
    projection on it gives the triplets, without a second sketch.

    Parameters
    ----------
    delta : ndarray, shape (m, n)
        The ΔW the engine decomposed.
    job : FactorJob
        Its analysis (the spectrum says which work is the right one) and rank.
    workings : Workings
        What the engine kept (:class:`~svdrank.spectra.recording.RecordingKernels`).
    oversample : int
        The columns beyond r a kept basis must have.

    Returns
    -------
    callable or None
        Computes the TruncatedSvd when called.
    """
    spectrum = job.result.spectrum
    if spectrum.complete and spectrum.engine == "gram" and workings.reduction is not None:
        vectors = top_eigenvectors(workings.reduction, job.rank)[1]
        return partial(vectors_svd, delta, vectors)
    sketch = workings.sketch
    if not spectrum.complete and sketch is not None and sketch.width >= job.rank + oversample:
        return partial(sketch_svd, delta, sketch, job.rank)
    return None


def _optimal_energy(svd: TruncatedSvd, job: FactorJob, total: float) -> float:
    """Σ_{i>r} σᵢ² from a complete SVD or spectrum, else ‖ΔW‖² less the best known Σ_{i≤r} σᵢ²."""
    for tail in (svd.tail_energy, job.known_tail):
        if tail is not None:
            return tail
    return max(total - max(svd.kept_energy, job.known_energy), 0.0)


def _excess(total: float, kept: float, optimal: float) -> bool:
    """Whether √(total − kept) exceeds NEAR_OPTIMAL·√optimal (beyond rounding)."""
    achieved = max(total - kept, 0.0)
    return math.sqrt(achieved) > NEAR_OPTIMAL * math.sqrt(optimal) + 1e-6 * math.sqrt(total)


@dataclass(frozen=True)
class CastFactors:
    """A layer's balanced factors as stored, with what their SVD said of them.

    Attributes
    ----------
    b, a : ndarray
        The factors in the storage dtype.
    underflows : int
        Their entries below the dtype's normal range.
    energy : float
        Σ_{i≤r} σ̂ᵢ² of the SVD they came from.
    method : str
        How its vectors were computed.
    error_energy : float or None
        ‖ΔW − s·B·A‖_F² when it was taken without ΔW (see
        :func:`~svdrank.spectra.factors.projected_residual_energy`), else None.
    """

    b: np.ndarray
    a: np.ndarray
    underflows: int
    energy: float
    method: str
    error_energy: float | None = None


def store(
    svd: TruncatedSvd,
    delta: np.ndarray | None,
    total: float,
    optimal: float,
    scale: float,
    dtype: str,
    name: str,
    residual: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> Factored:
    """Cast balanced factors to ``dtype`` and measure the error they have as stored.

    ``optimal`` is Σ_{i>r} σᵢ², the least error² of any rank-r approximation.
    ``residual(b, a)`` gives ‖ΔW − s·B·A‖_F² of the stored factors; by default
    it is formed against ``delta`` block by block.

    Raises
    ------
    NumericalError
        If a factor overflows ``dtype`` (F16's largest number is 65504).
    """
    cast = cast_factors(svd, scale, dtype, name)
    return measure_stored(cast, delta, total, optimal, scale, residual)


def cast_factors(
    svd: TruncatedSvd,
    scale: float,
    dtype: str,
    name: str,
    *,
    overwrite: bool = False,
    total: float | None = None,
) -> CastFactors:
    """Split an SVD into balanced factors for scale ``s`` and cast them to ``dtype``.

    With ``overwrite`` the SVD's vectors are scaled in place into the factors
    (see :func:`~svdrank.spectra.factors.lora_factors`): one layer's factors
    fewer in memory, for a caller that drops the SVD after. Given ΔW's energy
    ``total``, factors from the projection of ΔW on its Gram matrix's
    eigenvectors (method "gram") get their stored error from the rounding
    (:func:`~svdrank.spectra.factors.projected_residual_energy`), where that
    is accurate, instead of a second m·n·r product.

    Raises
    ------
    NumericalError
        If a factor overflows ``dtype`` (F16's largest number is 65504).
    """
    b, a = lora_factors(svd, scale, overwrite=overwrite)
    stored_b, stored_a = _cast(b, dtype, name), _cast(a, dtype, name)
    underflows = _underflows(b, dtype) + _underflows(a, dtype)
    error = None
    if total is not None and svd.method == "gram":
        error = projected_residual_energy(total, svd.values, (b, a), (stored_b, stored_a), scale)
    return CastFactors(stored_b, stored_a, underflows, svd.kept_energy, svd.method, error)


def measure_stored(
    cast: CastFactors,
    delta: np.ndarray | None,
    total: float,
    optimal: float,
    scale: float,
    residual: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> Factored:
    """Measure stored factors' error ‖ΔW − s·B·A‖_F², by ``residual`` or against ``delta``.

    An error the cast already took (:attr:`CastFactors.error_energy`) is kept.
    """
    if cast.error_energy is not None:
        error_energy = cast.error_energy
    elif residual is None:
        assert delta is not None
        error_energy = residual_energy(delta, cast.b, cast.a, scale)
    else:
        error_energy = residual(cast.b, cast.a)
    quality = FactorQuality(
        energy=cast.energy / total if total > 0 else 1.0,
        error=relative_error(error_energy, total),
        optimal=relative_error(optimal, total),
        method=cast.method,
        underflows=cast.underflows,
    )
    return Factored(cast.b, cast.a, quality)


def _cast(factor: np.ndarray, dtype: str, name: str) -> np.ndarray:
    """Round a factor to the storage dtype (to nearest), refusing an overflow."""
    with np.errstate(over="ignore"):
        stored = factor.astype(DTYPES[dtype], copy=False)
    if not np.all(np.isfinite(stored)):
        raise NumericalError(
            f"layer {name}: a LoRA factor overflows {dtype}; use --dtype fp32 or bf16"
        )
    return stored


def _underflows(factor: np.ndarray, dtype: str) -> int:
    """Count non-zero entries below the smallest normal number of ``dtype`` (a block at a time)."""
    tiny = float(np.finfo(DTYPES[dtype]).tiny) if dtype != "BF16" else 2.0**-126
    rows = max(1, RESIDUAL_CHUNK_BYTES // max(factor.shape[1] * factor.itemsize, 1))
    count = 0
    for start in range(0, factor.shape[0], rows):
        magnitude = np.abs(factor[start : start + rows])
        count += int(np.count_nonzero((magnitude > 0) & (magnitude < tiny)))
    return count
