"""Run the pipeline over every layer: read, form ΔW, decompose, keep the results.

``analyze`` streams layer by layer: ΔW of the next layer is formed (from the
memory-mapped tensors, in one pass) while the current one is decomposed, so
reading overlaps computing and at most two layers' updates are in memory.
The result is saved and loaded by :mod:`svdrank.analysis_file`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from svdrank import __version__
from svdrank.adaptive import EngineSettings, decompose
from svdrank.checkpoint import (
    Checkpoint,
    forget_pages,
    header_sha256,
    open_checkpoint,
    read_tensor_view,
)
from svdrank.energy import METRICS
from svdrank.engines import Spectrum, require_finite, sum_of_squares
from svdrank.errors import UsageError
from svdrank.pairing import Layer, Skipped, pair_checkpoints


@dataclass(frozen=True)
class LayerResult:
    """What the analysis keeps of one layer: identity, norms and its spectrum."""

    module: str
    name: str
    kind: str
    block: int | None
    role: str
    shape: tuple[int, int]
    dtype: str
    delta_norm: float
    base_norm: float | None
    spectrum: Spectrum
    seconds: float = 0.0

    @property
    def full_params(self) -> int:
        """m·n, the parameters full fine-tuning trains in this layer."""
        return self.shape[0] * self.shape[1]

    @property
    def relative_change(self) -> float | None:
        """‖ΔW‖_F / ‖W_base‖_F; None without a base (adapters), inf for a zero base."""
        if self.base_norm is None:
            return None
        return self.delta_norm / self.base_norm if self.base_norm else math.inf


@dataclass(frozen=True)
class AnalysisSettings:
    """How the spectra were computed; stored in the analysis file."""

    engine: EngineSettings = field(default_factory=EngineSettings)
    metric: str = "fro"
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_conv: bool = False
    workers: int = 1

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise UsageError(f"unknown metric {self.metric!r}; choose fro or nuclear")
        if self.workers < 1:
            raise UsageError(f"--workers must be ≥ 1, got {self.workers}")
        if self.metric == "nuclear" and not self.engine.complete:
            object.__setattr__(self, "engine", replace(self.engine, complete=True))


@dataclass(frozen=True)
class Analysis:
    """The result of ``svdrank diff``: inputs, settings, one LayerResult per layer, skips."""

    inputs: dict[str, Any]
    settings: AnalysisSettings
    layers: tuple[LayerResult, ...]
    skipped: tuple[Skipped, ...]
    created: str = ""
    version: str = __version__


@dataclass(frozen=True)
class ProgressUpdate:
    """What a progress callback hears after each layer."""

    layer: LayerResult
    layers_done: int
    layers_total: int
    bytes_done: int
    bytes_total: int


Progress = Callable[[ProgressUpdate], None]


def analyze(
    base: str | Path,
    tuned: str | Path,
    *,
    engine: str = "auto",
    metric: str = "fro",
    max_energy: float = 0.95,
    oversample: int = 10,
    power_iters: int = 2,
    normalizer: str = "lu",
    krylov: bool = False,
    seed: int = 0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    include_conv: bool = False,
    workers: int = 1,
    progress: Progress | None = None,
) -> Analysis:
    """Decompose every layer's update ΔW = W_tuned − W_base.

    Parameters
    ----------
    base, tuned : str or Path
        Checkpoints: a ``.safetensors`` file, a shard directory or an index file.
    engine : {"auto", "exact", "gram", "randomized", "lanczos"}
    metric : {"fro", "nuclear"}
        ``nuclear`` needs complete spectra, so every layer goes to ``exact``.
    max_energy : float
        Truncated engines compute values until they hold this share of ‖ΔW‖_F²:
        the highest energy target ``recommend`` can answer from a truncated spectrum.
    oversample, power_iters, normalizer, krylov
        Randomized engine settings (see ``svdrank.engines.randomized_values``).
    seed : int
        Seeds every layer's sketch (layer i uses ``[seed, i]``): reproducible
        whatever the number of workers.
    include, exclude : sequence of str
        Glob patterns on module names.
    include_conv : bool
        Analyse 4-D conv kernels reshaped to (out, in·kh·kw).
    workers : int
        Layers decomposed at once (each with its own BLAS calls).
    progress : callable, optional
        Called after each layer with a :class:`ProgressUpdate`.

    Returns
    -------
    Analysis

    Examples
    --------
    >>> from svdrank import analyze
    >>> analysis = analyze("sample_checkpoints/base.safetensors",
    ...                    "sample_checkpoints/tuned.safetensors")
    >>> len(analysis.layers)
    29
    """
    settings = AnalysisSettings(
        engine=EngineSettings(
            engine=engine,
            max_energy=max_energy,
            oversample=oversample,
            power_iters=power_iters,
            normalizer=normalizer,
            krylov=krylov,
        ),
        metric=metric,
        seed=seed,
        include=tuple(include),
        exclude=tuple(exclude),
        include_conv=include_conv,
        workers=workers,
    )
    base_checkpoint, tuned_checkpoint = open_checkpoint(base), open_checkpoint(tuned)
    pairing = pair_checkpoints(
        base_checkpoint, tuned_checkpoint, settings.include, settings.exclude, include_conv
    )
    results = tuple(_analyze_layers(pairing.layers, settings, progress))
    return Analysis(
        inputs={"base": describe_input(base_checkpoint), "tuned": describe_input(tuned_checkpoint)},
        settings=settings,
        layers=results,
        skipped=pairing.skipped,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def describe_input(checkpoint: Checkpoint) -> dict[str, Any]:
    """Path, files, sizes and header digests of one input, for the analysis file."""
    return {
        "path": str(checkpoint.path),
        "bytes": checkpoint.nbytes,
        "files": [
            {"name": file.name, "bytes": file.stat().st_size, "header_sha256": header_sha256(file)}
            for file in checkpoint.files
        ],
    }


def layer_bytes(layer: Layer) -> int:
    """Bytes read from both checkpoints for one layer."""
    return layer.base.nbytes + layer.tuned.nbytes


@dataclass(frozen=True)
class FormedDelta:
    """One layer's update as the reader hands it over: ΔW and the sums formed with it."""

    delta: np.ndarray
    total_energy: float
    base_norm: float


FORM_CHUNK_BYTES = 16 << 20
"""ΔW is formed this many bytes of each input at a time, each chunk's pages dropped after."""


def form_delta(layer: Layer) -> FormedDelta:
    """ΔW in float32 (float64 when an input is F64), ‖ΔW‖_F² and ‖W_base‖_F.

    One pass over the two memory-mapped tensors, a chunk of rows at a time:
    the subtraction casts as it goes, so no widened copy of either input is
    made, and each chunk's mapped pages are dropped once used (they would
    otherwise count in the resident size until the layer is done: 2 × 90 MB
    for a 7B MLP layer in BF16). The sums of squares accumulate in float64
    (see ``sum_of_squares``).

    Raises
    ------
    NumericalError
        If ΔW holds NaN or Inf.
    """
    rows, columns = layer.shape
    base = read_tensor_view(layer.base).reshape(rows, columns)
    tuned = read_tensor_view(layer.tuned).reshape(rows, columns)
    wide = np.float64 if "F64" in (layer.base.dtype, layer.tuned.dtype) else np.float32
    delta = np.empty(layer.shape, dtype=wide)
    row_bytes = max(columns * max(base.itemsize, tuned.itemsize), 1)
    step = max(1, FORM_CHUNK_BYTES // row_bytes)
    base_energy = 0.0
    for start in range(0, rows, step):
        chunk = slice(start, start + step)
        np.subtract(tuned[chunk], base[chunk], out=delta[chunk], dtype=wide)
        base_energy += sum_of_squares(base[chunk])
        forget_pages(tuned[chunk])
        forget_pages(base[chunk])
    energy = require_finite(sum_of_squares(delta), layer.name)
    return FormedDelta(delta, energy, math.sqrt(base_energy))


def _analyze_layers(
    layers: Sequence[Layer], settings: AnalysisSettings, progress: Progress | None
) -> Iterator[LayerResult]:
    """Results in layer order, reading the next layer while earlier ones decompose.

    At most ``workers`` updates are being decomposed and one more is being
    formed, so memory holds ``workers + 1`` layers' ΔW at the most.

    Layers of the same kind and shape tend to decay alike (all q_proj of a
    model, say): once one of them needed its complete spectrum, the next is
    decomposed with ``expect_slow`` (see :func:`svdrank.adaptive.decompose`).
    The hint is always the outcome of the last earlier layer of the same kind
    and shape (waited for if still running), so results do not depend on
    ``workers`` or timing.
    """
    report = _reporter(layers, progress)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="svdrank-read")
    pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="svdrank-svd")
    in_flight: deque[tuple[Layer, Future[LayerResult]]] = deque()
    last_alike: dict[tuple[str, tuple[int, int]], Future[LayerResult]] = {}
    try:
        next_read = reader.submit(form_delta, layers[0])
        for index, layer in enumerate(layers):
            formed = next_read.result()
            if len(in_flight) == settings.workers:
                yield _finish(*in_flight.popleft(), report)
            alike = last_alike.get((layer.kind, layer.shape))
            hint = alike is not None and needed_complete(alike.result().spectrum)
            task = pool.submit(_analyze_layer, layer, formed, index, settings, hint)
            last_alike[(layer.kind, layer.shape)] = task
            in_flight.append((layer, task))
            del formed
            if index + 1 < len(layers):
                next_read = reader.submit(form_delta, layers[index + 1])
        while in_flight:
            yield _finish(*in_flight.popleft(), report)
    finally:
        reader.shutdown(wait=False, cancel_futures=True)
        pool.shutdown(wait=False, cancel_futures=True)


def needed_complete(spectrum: Spectrum) -> bool:
    """Whether a layer's spectrum decayed too slowly for a sketch (it went to Gram whole)."""
    return spectrum.engine == "gram" and spectrum.complete


def _analyze_layer(
    layer: Layer,
    formed: FormedDelta,
    index: int,
    settings: AnalysisSettings,
    expect_slow: bool = False,
) -> LayerResult:
    """Decompose one layer's update (runs in a worker thread)."""
    started = time.perf_counter()
    rng = np.random.default_rng([settings.seed, index])
    spectrum = decompose(
        formed.delta, settings.engine, rng, layer.name, formed.total_energy, expect_slow
    )
    return LayerResult(
        module=layer.module,
        name=layer.name,
        kind=layer.kind,
        block=layer.block,
        role=layer.role,
        shape=layer.shape,
        dtype=layer.base.dtype,
        delta_norm=math.sqrt(spectrum.total_energy),
        base_norm=formed.base_norm,
        spectrum=spectrum,
        seconds=time.perf_counter() - started,
    )


def _reporter(
    layers: Sequence[Layer], progress: Progress | None
) -> Callable[[Layer, LayerResult], None]:
    """A function that counts finished layers and bytes and tells ``progress``."""
    done = {"layers": 0, "bytes": 0}
    bytes_total = sum(layer_bytes(layer) for layer in layers)

    def report(layer: Layer, result: LayerResult) -> None:
        done["layers"] += 1
        done["bytes"] += layer_bytes(layer)
        if progress is not None:
            progress(
                ProgressUpdate(result, done["layers"], len(layers), done["bytes"], bytes_total)
            )

    return report


def _finish(
    layer: Layer, task: Future[LayerResult], report: Callable[[Layer, LayerResult], None]
) -> LayerResult:
    """Wait for one layer's result and report it."""
    result = task.result()
    report(layer, result)
    return result
