"""Run the pipeline over every layer: read, form ΔW, decompose, keep the results.

``analyze`` streams layer by layer: ΔW of the next layer is formed (from the
memory-mapped tensors, in one pass) while earlier ones are decomposed, so
reading overlaps computing and at most ``workers + 1`` layers' updates are in
memory; with a cluster, each worker forms and decomposes its own layers
(:mod:`svdrank.analysis.runners` chooses where). Each finished layer is
appended to the run's results log (:mod:`svdrank.analysis.resume`), from which
an interrupted run resumes. The result is saved and loaded by
:mod:`svdrank.analysis.file`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path

from svdrank.analysis.adapter import analyze_adapter
from svdrank.analysis.delta import FormedDelta, form_delta
from svdrank.analysis.floor import spectrum_with_noise
from svdrank.analysis.resume import ResultsLog, open_results_log, run_header
from svdrank.analysis.runners import (
    LayerSteps,
    Runner,
    progress_reporter,
    runner_for,
    two_waves,
)
from svdrank.errors import SvdrankWarning, UsageError
from svdrank.inputs.adapter import is_adapter
from svdrank.inputs.checkpoint import Checkpoint, describe_input, open_checkpoint
from svdrank.inputs.model import model_config_path, runtime_targets
from svdrank.inputs.pairing import pair_checkpoints
from svdrank.spectra.devices import Kernels
from svdrank.types import (
    Analysis,
    AnalysisSettings,
    EngineSettings,
    Layer,
    LayerResult,
    ModelInfo,
    Progress,
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
    device: str = "cpu",
    cluster: str | None = None,
    progress: Progress | None = None,
    results_log: str | Path | None = None,
    resume: bool = False,
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
    device : {"cpu", "cuda", "auto", "torch-cpu"}
        Where the spectra are computed (see
        :func:`svdrank.spectra.devices.kernels_for`): ``cpu`` NumPy and SciPy,
        ``cuda`` torch on a CUDA GPU, ``auto`` cuda when there is one.
        With torch, ΔW is formed on the device from the stored bytes; the
        noise floor is estimated on the host. With a ``cluster``, resolved on
        each worker (each uses its own GPU).
    cluster : str, optional
        Compute the layers on a Dask cluster (``pip install 'svdrank[cluster]'``):
        a scheduler's address (``tcp://host:8786``) or ``local:N`` for N worker
        processes on this machine, started for the run (see
        :func:`svdrank.analysis.cluster.dask_runner`). Every worker reads the
        checkpoints from the same paths; the analysis is the same as a local
        run's (timings aside). ``workers`` must then be left at 1.
    progress : callable, optional
        Called after each layer with a :class:`~svdrank.types.ProgressUpdate`:
        first for the layers a resumed run found in its log, then for each layer
        as it finishes (not necessarily in layer order).
    results_log : str or Path, optional
        Append each finished layer to this file (see
        :mod:`svdrank.analysis.resume`; ``svdrank diff`` keeps it beside the
        analysis file, ``OUTPUT.resume``). It stays after an interruption or a
        crash and is removed on an error of the inputs (a NaN, an unreadable
        file); the caller removes it once the analysis is saved. Not kept for
        an adapter.
    resume : bool
        Continue from ``results_log``: the layers it holds are taken as they
        are and only the others are computed, giving the same analysis as an
        uninterrupted run (timings aside). Without a log there, the run starts
        from the first layer. Without ``resume``, an existing log is replaced.

    Returns
    -------
    Analysis

    Raises
    ------
    UsageError
        For an option out of range, an option that does not apply to an
        adapter (its spectra are exact from the r×r core: no engine settings,
        seed, conv kernels, workers, device, cluster or resuming), ``resume`` without a
        ``results_log``, a log of another run (other inputs, settings or
        svdrank version), a device this machine lacks (no torch, no CUDA), or
        a cluster that cannot be used (no Dask, no scheduler at the address,
        workers that do not see the same files).
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
        _refuse_for_adapters(settings, workers, device, resume, cluster)
        return analyze_adapter(base, settings)
    if resume and results_log is None:
        raise UsageError("resuming needs the results log to resume from")
    base_checkpoint, tuned_checkpoint = open_checkpoint(base), open_checkpoint(tuned)
    pairing = pair_checkpoints(
        base_checkpoint, tuned_checkpoint, settings.include, settings.exclude, include_conv
    )
    model, layers = place_in_model(pairing.layers, tuned_checkpoint, base_checkpoint)
    header = run_header(base_checkpoint, tuned_checkpoint, settings)
    log = None if results_log is None else Path(results_log)
    files = (*base_checkpoint.files, *tuned_checkpoint.files)
    with runner_for(workers, device, cluster, files) as runner, open_results_log(
        log, header, layers, resume
    ) as opened:
        results = _run(layers, settings, runner, progress, opened)
    return Analysis(
        inputs={"base": describe_input(base_checkpoint), "tuned": describe_input(tuned_checkpoint)},
        settings=settings,
        layers=results,
        skipped=pairing.skipped,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=model,
    )


def place_in_model(
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


def _refuse_for_adapters(
    settings: AnalysisSettings, workers: int, device: str, resume: bool, cluster: str | None
) -> None:
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
    given += ["--device"] if device not in ("cpu", "auto") else []
    given += ["--resume"] if resume else []
    given += ["--cluster"] if cluster is not None else []
    if given:
        raise UsageError(
            f"{', '.join(given)} do not apply to a PEFT adapter (its spectra are exact, from "
            "each module's r×r core); only --metric, --include and --exclude do"
        )


def _run(
    layers: Sequence[Layer],
    settings: AnalysisSettings,
    runner: Runner,
    progress: Progress | None,
    log: ResultsLog,
) -> tuple[LayerResult, ...]:
    """Compute the layers the log lacks, logging and reporting each; all results in layer order."""
    report = progress_reporter(layers, progress)
    results = dict(log.known)
    for index in sorted(log.known):
        report(layers[index], log.known[index])
    waves = two_waves(layers, log.known)
    steps = LayerSteps(form_delta, analyze_layer)
    for index, result in runner.results(layers, waves, settings, steps):
        log.append(index, result)
        results[index] = result
        report(layers[index], result)
    return tuple(results[index] for index in range(len(layers)))


def analyze_layer(
    layer: Layer,
    formed: FormedDelta,
    index: int,
    settings: AnalysisSettings,
    kernels: Kernels,
    expect_slow: bool = False,
) -> LayerResult:
    """Decompose one layer's update and set its noise floor (runs in a worker thread)."""
    started = time.perf_counter()
    spectrum, noise = spectrum_with_noise(layer, formed, settings, index, expect_slow, kernels)
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
