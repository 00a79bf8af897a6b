"""Extraction in one pass: each layer's ΔW is formed once, analysed, ranked and factored.

For rank rules that decide each layer on its own (presets, energy targets,
σ ratios, thresholds, one rank), nothing has to wait for the whole analysis:
the layer is decomposed exactly as :func:`svdrank.analyze` decomposes it
(same engine, seed ``[seed, i]``, noise floor, and the hint of its group's
probe, which comes earlier in layer order), its rank is read from that result,
and its factors are computed from the ΔW still in memory and from what the
engine computed on it (the Gram matrix's tridiagonal reduction, or the
sketch's basis; see :mod:`svdrank.spectra.recording`). The next layer is
formed while one is worked on, so at most two layers' updates are in memory,
``diff``'s bound; its forming starts once the current layer's peak is past
(after its analysis, or after the top eigenvectors of a Gram reduction, when
stevd holds two n×n arrays beside it), so the two peaks never meet. The
factors are spooled to a temporary file (the weights file's header needs
every rank first) and handed back in the order asked for.
A layer's work once formed (:func:`pass_layer`) is also what a cluster's
task does with it (:mod:`svdrank.analysis.extract_cluster`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import BinaryIO

import numpy as np

from svdrank.analysis.delta import FormedDelta, form_delta, layer_bytes
from svdrank.analysis.extract import Factored, FactorJob, FactorSettings, factor_update
from svdrank.analysis.pipeline import analyze_layer
from svdrank.analysis.runners import alike_key, forms_noise, hinted, needed_complete
from svdrank.inputs.checkpoint import DTYPES
from svdrank.spectra.recording import RecordingKernels
from svdrank.types import AnalysisSettings, Layer, LayerResult, Progress, ProgressUpdate


@dataclass(frozen=True)
class _Spooled:
    """Where a layer's stored factors lie in the spool file, with their shapes and quality."""

    offset: int
    b_shape: tuple[int, int]
    a_shape: tuple[int, int]
    factored: Factored


class FactorSpool:
    """Factors written to an anonymous temporary file as they are computed, read back by module.

    Holds one layer's factors in memory at a time, whatever the adapter's size.
    Use as a context manager; the file disappears when it closes.
    """

    def __init__(self, dtype: str) -> None:
        self._dtype = np.dtype(DTYPES[dtype])
        self._file: BinaryIO = tempfile.TemporaryFile(prefix="svdrank-factors-")
        self._stored: dict[str, _Spooled] = {}

    def __enter__(self) -> FactorSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def add(self, module: str, factored: Factored) -> None:
        """Append a module's factors (their arrays leave memory; the quality stays)."""
        offset = self._file.seek(0, 2)
        for factor in (factored.b, factored.a):
            self._file.write(np.ascontiguousarray(factor).tobytes())
        empty = np.empty((0, 0), self._dtype)
        self._stored[module] = _Spooled(
            offset, factored.b.shape, factored.a.shape, replace(factored, b=empty, a=empty)
        )

    def read(self, module: str) -> Factored:
        """Return a module's factors as they were added."""
        spooled = self._stored[module]
        self._file.seek(spooled.offset)
        b, a = (self._read_array(shape) for shape in (spooled.b_shape, spooled.a_shape))
        return replace(spooled.factored, b=b, a=a)

    def _read_array(self, shape: tuple[int, int]) -> np.ndarray:
        """Read one array of ``shape`` at the file's position."""
        count = shape[0] * shape[1]
        data = self._file.read(count * self._dtype.itemsize)
        return np.frombuffer(data, dtype=self._dtype).reshape(shape)


@dataclass(frozen=True)
class PassSteps:
    """What one pass does to a formed layer: analyse it, rank it by a rule, factor it.

    Picklable (for a cluster's workers) when the callables are module-level
    functions or :func:`functools.partial` of them.

    Attributes
    ----------
    settings : AnalysisSettings
        The analysis's settings; its seed seeds layer i's spectrum with ``[seed, i]``.
    rank_of : callable
        A layer's rank from its LayerResult (the rank rule, applied to that layer alone).
    scale_of : callable
        The LoRA scale s of a module of rank r.
    factor_settings : FactorSettings
        Its seed seeds layer i's factors with ``[seed, i]``.
    """

    settings: AnalysisSettings
    rank_of: Callable[[LayerResult], int]
    scale_of: Callable[[int], float]
    factor_settings: FactorSettings


LayerPass = tuple[LayerResult, int, Factored | None]
"""A layer's analysis, rank and stored factors (None at rank 0)."""


def analyze_and_factor(
    layers: Sequence[Layer],
    settings: AnalysisSettings,
    rank_of: Callable[[LayerResult], int],
    scale_of: Callable[[int], float],
    factor_settings: FactorSettings,
    progress: Progress | None = None,
) -> Iterator[LayerPass]:
    """Analyse every layer as ``analyze`` does and factor it at the rank its result gets.

    Parameters
    ----------
    layers : sequence of Layer
        In the analysis's order (placed in the model as ``analyze`` places them).
    settings, rank_of, scale_of, factor_settings
        As in :class:`PassSteps`.
    progress : callable, optional
        Told after each layer (bytes are those read from both checkpoints).

    Yields
    ------
    tuple of (LayerResult, int, Factored or None)
        Per layer, in order: ``analyze``'s result (its ``seconds`` aside), the
        rank, and the stored factors (None at rank 0).

    Raises
    ------
    NumericalError
        If ΔW holds NaN or Inf, or a factor overflows the storage dtype.
    """
    if not layers:
        return
    steps = PassSteps(settings, rank_of, scale_of, factor_settings)
    noisy = forms_noise(settings)
    probes: dict[tuple[str, str, tuple[int, int]], int] = {}
    results: list[LayerResult] = []
    total_bytes = sum(layer_bytes(layer) for layer in layers)
    done_bytes = 0
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="svdrank-read")
    try:
        reads = {0: reader.submit(form_delta, layers[0], noisy)}

        def read_next() -> None:
            """Start forming the layer after this one, once (when this one's peak is past)."""
            following = index + 1
            if following < len(layers) and following not in reads:
                reads[following] = reader.submit(form_delta, layers[following], noisy)

        for index, layer in enumerate(layers):
            formed = reads.pop(index).result()
            probe = probes.setdefault(alike_key(layer), index)
            hint = hinted(None if probe == index else results[probe])
            result, rank, factored = pass_layer(layer, formed, index, steps, hint, read_next)
            read_next()
            results.append(result)
            del formed
            yield result, rank, factored
            done_bytes += layer_bytes(layer)
            if progress is not None:
                progress(ProgressUpdate(result, index + 1, len(layers), done_bytes, total_bytes))
    finally:
        reader.shutdown(wait=False, cancel_futures=True)


def pass_layer(
    layer: Layer,
    formed: FormedDelta,
    index: int,
    steps: PassSteps,
    expect_slow: bool,
    analysed: Callable[[], None] = lambda: None,
) -> LayerPass:
    """Analyse one formed layer, rank it and factor it from the engine's own work on its ΔW.

    ``analysed`` is told once the layer's memory peak is past: right after
    the analysis, or, for a complete Gram spectrum, once the top eigenvectors
    are out of its reduction (stevd needs two n×n arrays beside it).
    """
    kernels = RecordingKernels()
    result = analyze_layer(layer, formed, index, steps.settings, kernels, expect_slow)
    reduced = needed_complete(result.spectrum)
    if not reduced:
        analysed()
    rank = steps.rank_of(result)
    if rank == 0:
        analysed()
        return result, rank, None
    job = FactorJob(layer, result, rank, steps.scale_of(rank), index)
    rng = np.random.default_rng([steps.factor_settings.seed, index])
    # Handed over, not kept here: factor_update drops the engine's work once the vectors are out.
    factored = factor_update(
        formed, job, steps.factor_settings, rng, kernels.take_workings(), analysed
    )
    return result, rank, factored
