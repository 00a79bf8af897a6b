"""Run the pipeline over every layer: read, form ΔW, decompose, keep the results.

``analyze`` streams layer by layer: ΔW of the next layer is formed (from the
memory-mapped tensors, in one pass) while the current one is decomposed, so
reading overlaps computing and at most two layers' updates are in memory.
The result is saved and loaded by :mod:`svdrank.analysis.file`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path

from svdrank.analysis.adapter import analyze_adapter
from svdrank.analysis.delta import FormedDelta, form_delta, layer_bytes
from svdrank.analysis.floor import spectrum_with_noise
from svdrank.errors import SvdrankWarning, UsageError
from svdrank.inputs.adapter import is_adapter
from svdrank.inputs.checkpoint import Checkpoint, describe_input, open_checkpoint
from svdrank.inputs.model import model_config_path, runtime_targets
from svdrank.inputs.pairing import pair_checkpoints
from svdrank.types import (
    Analysis,
    AnalysisSettings,
    EngineSettings,
    Layer,
    LayerResult,
    ModelInfo,
    Progress,
    ProgressUpdate,
    Spectrum,
)


def analyze(
    base: str | Path,
    tuned: str | Path | None = None,
    *,
    engine: str = "auto",
    metric: str = "fro",
    max_energy: float = 0.95,
    oversample: int = 10,
    power_iters: int = 2,
    normalizer: str = "lu",
    lanczos_solver: str = "arpack",
    krylov: bool = False,
    seed: int = 0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    include_conv: bool = False,
    noise: str = "auto",
    workers: int = 1,
    progress: Progress | None = None,
) -> Analysis:
    """Decompose every layer's update: ΔW = W_tuned − W_base, or s·B·A of an adapter.

    Parameters
    ----------
    base : str or Path
        The base checkpoint (a ``.safetensors`` file, a shard directory or an
        index file), or a PEFT LoRA adapter directory when ``tuned`` is None.
    tuned : str or Path, optional
        The tuned checkpoint; leave out to analyse an adapter.
    engine : {"auto", "exact", "gram", "randomized", "lanczos"}
    metric : {"fro", "nuclear"}
        ``nuclear`` needs complete spectra, so every layer goes to ``exact``.
    max_energy : float
        Truncated engines compute values until they hold this share of ‖ΔW‖_F²:
        the highest energy target ``recommend`` can answer from a truncated spectrum.
    oversample, power_iters, normalizer, krylov
        Randomized engine settings (see ``svdrank.spectra.kernels.randomized_values``).
    lanczos_solver : {"arpack", "propack"}
        The solver of the lanczos engine.
    seed : int
        Seeds every layer's sketch (layer i uses ``[seed, i]``): reproducible
        whatever the number of workers. A non-negative integer.
    include, exclude : sequence of str
        Glob patterns on module names.
    include_conv : bool
        Analyse 4-D conv kernels reshaped to (out, in·kh·kw).
    noise : {"auto", "full", "off"}
        ``auto``: for every layer stored on a BF16, F16 or F8 grid, model the
        rounding noise in ΔW, set the threshold τ above it and count the
        signal rank; truncated engines stop once a value falls to τ. Where
        cheap bounds on τ already decide every preset's rank, τ is their high
        end and the signal rank a lower bound. ``full``: estimate τ for every
        such layer (exact signal ranks; slower). ``off``: raw spectra only.
    workers : int
        Layers decomposed at once (each with its own BLAS calls).
    progress : callable, optional
        Called after each layer with a :class:`~svdrank.types.ProgressUpdate`.

    Returns
    -------
    Analysis

    Raises
    ------
    UsageError
        For an option out of range, or an option that does not apply to an
        adapter (its spectra are exact from the r×r core: no engine settings,
        seed, conv kernels or workers).
    CheckpointError, PairingError, NumericalError
        For unreadable inputs, no layers in common, or NaN/Inf in an update.

    Examples
    --------
    >>> from svdrank import analyze
    >>> analysis = analyze("sample_checkpoints/base.safetensors",
    ...                    "sample_checkpoints/tuned.safetensors")
    >>> len(analysis.layers)
    29
    """
    if seed < 0:
        raise UsageError(f"--seed must be ≥ 0, got {seed}")
    if workers < 1:
        raise UsageError(f"--workers must be ≥ 1, got {workers}")
    settings = AnalysisSettings(
        engine=EngineSettings(
            engine=engine,
            max_energy=max_energy,
            oversample=oversample,
            power_iters=power_iters,
            normalizer=normalizer,
            lanczos_solver=lanczos_solver,
            krylov=krylov,
        ),
        metric=metric,
        seed=seed,
        include=tuple(include),
        exclude=tuple(exclude),
        include_conv=include_conv,
        noise=noise,
    )
    if tuned is None:
        if not is_adapter(base):
            raise UsageError(
                f"{base}: give BASE and TUNED checkpoints, or a PEFT adapter directory alone"
            )
        _refuse_for_adapters(settings, workers)
        return analyze_adapter(base, settings)
    base_checkpoint, tuned_checkpoint = open_checkpoint(base), open_checkpoint(tuned)
    pairing = pair_checkpoints(
        base_checkpoint, tuned_checkpoint, settings.include, settings.exclude, include_conv
    )
    model, layers = _place_in_model(pairing.layers, tuned_checkpoint, base_checkpoint)
    results = tuple(_analyze_layers(layers, settings, workers, progress))
    return Analysis(
        inputs={"base": describe_input(base_checkpoint), "tuned": describe_input(tuned_checkpoint)},
        settings=settings,
        layers=results,
        skipped=pairing.skipped,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=model,
    )


def _place_in_model(
    layers: tuple[Layer, ...], *checkpoints: Checkpoint
) -> tuple[ModelInfo | None, tuple[Layer, ...]]:
    """Give each layer its runtime target when a checkpoint (tuned first) has a ``config.json``."""
    for checkpoint in checkpoints:
        config = model_config_path(checkpoint.path)
        if config is not None:
            model, targets = runtime_targets(config, checkpoint.tensors)
            placed = tuple(replace(layer, target=targets.get(layer.name)) for layer in layers)
            _warn_unmatched(model, placed)
            return model, placed
    return None, layers


def _warn_unmatched(model: ModelInfo, layers: tuple[Layer, ...]) -> None:
    """Warn when transformers built the model but some layers have no counterpart in it."""
    unmatched = [layer.module for layer in layers if layer.target is None]
    if model.transformers is not None and unmatched:
        warnings.warn(
            f"{len(unmatched)} of {len(layers)} layers ({unmatched[0]}, …) have no counterpart "
            f"in {model.architecture or model.model_type} as transformers {model.transformers} "
            "builds it; a PEFT config cannot target them",
            SvdrankWarning,
            stacklevel=2,
        )


def _refuse_for_adapters(settings: AnalysisSettings, workers: int) -> None:
    """Raise when an option was given that an adapter analysis cannot honour.

    Only the metric and the include/exclude globs apply to an adapter: its
    spectra come exactly from each module's r×r core.
    """
    default = AnalysisSettings(
        engine=EngineSettings(complete=settings.engine.complete),
        metric=settings.metric,
        include=settings.include,
        exclude=settings.exclude,
    )
    given = [
        f"--{item.name.replace('_', '-')}"
        for item in fields(EngineSettings)
        if getattr(settings.engine, item.name) != getattr(default.engine, item.name)
    ]
    given += [
        f"--{name.replace('_', '-')}"
        for name in ("seed", "include_conv")
        if getattr(settings, name) != getattr(default, name)
    ]
    given += ["--workers"] if workers != 1 else []
    if given:
        raise UsageError(
            f"{', '.join(given)} do not apply to a PEFT adapter (its spectra are exact, from "
            "each module's r×r core); only --metric, --include and --exclude do"
        )


def _analyze_layers(
    layers: Sequence[Layer], settings: AnalysisSettings, workers: int, progress: Progress | None
) -> Iterator[LayerResult]:
    """Results in layer order, reading the next layer while earlier ones decompose.

    At most ``workers`` updates are being decomposed and one more is being
    formed, so memory holds ``workers + 1`` layers' ΔW at the most.

    Layers of the same kind and shape tend to decay alike (all q_proj of a
    model, say): once one of them needed its complete spectrum, the next is
    decomposed with ``expect_slow`` (see :func:`svdrank.spectra.engines.decompose`).
    The hint is always the outcome of the last earlier layer of the same kind
    and shape (waited for if still running), so results do not depend on
    ``workers`` or timing.
    """
    report = _reporter(layers, progress)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="svdrank-read")
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="svdrank-svd")
    in_flight: deque[tuple[Layer, Future[LayerResult]]] = deque()
    last_alike: dict[tuple[str, str, tuple[int, int]], Future[LayerResult]] = {}
    try:
        noisy = settings.noise != "off"
        next_read = reader.submit(form_delta, layers[0], noisy)
        for index, layer in enumerate(layers):
            formed = next_read.result()
            if len(in_flight) == workers:
                yield _finish(*in_flight.popleft(), report)
            alike = last_alike.get((layer.stack, layer.kind, layer.shape))
            hint = alike is not None and needed_complete(alike.result().spectrum)
            task = pool.submit(_analyze_layer, layer, formed, index, settings, hint)
            last_alike[(layer.stack, layer.kind, layer.shape)] = task
            in_flight.append((layer, task))
            del formed
            if index + 1 < len(layers):
                next_read = reader.submit(form_delta, layers[index + 1], noisy)
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
    """Decompose one layer's update and set its noise floor (runs in a worker thread)."""
    started = time.perf_counter()
    spectrum, noise = spectrum_with_noise(layer, formed, settings, index, expect_slow)
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
        stack=layer.stack,
        expert=layer.expert,
        target=layer.target,
        noise=noise,
    )


def _reporter(
    layers: Sequence[Layer], progress: Progress | None
) -> Callable[[Layer, LayerResult], None]:
    """Make a callback that counts finished layers and bytes and tells ``progress``."""
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
