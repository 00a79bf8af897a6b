"""Where the layers are computed: the one place that chooses, and the local thread runner.

A runner takes the layers a run still lacks and yields ``(index, LayerResult)``
pairs as they finish; :func:`svdrank.analysis.pipeline.analyze` logs and reports
them and never asks how they were computed. :func:`runner_for` picks the runner
once per run: :class:`ThreadRunner` (threads of this process) without a cluster
address, :class:`svdrank.analysis.cluster.DaskRunner` with one (imported only
then: Dask is an optional extra). Another backend (Ray, say) is one more module
with a runner and one more branch here.

Every runner computes the same two waves (:func:`two_waves`), so the analysis
does not depend on where or on how many workers it ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from svdrank.analysis.delta import FormedDelta, layer_bytes
from svdrank.errors import UsageError
from svdrank.spectra.devices import HOST, Kernels, kernels_for
from svdrank.types import (
    AnalysisSettings,
    Layer,
    LayerResult,
    Progress,
    ProgressUpdate,
    Spectrum,
)

AnalyzeLayer = Callable[[Layer, FormedDelta, int, AnalysisSettings, Kernels, bool], LayerResult]
"""Decompose one formed layer: (layer, formed, index, settings, kernels, expect_slow) → result."""


class FormLayer(Protocol):
    """Form one layer's ΔW for the kernels that will decompose it (on their device)."""

    def __call__(self, layer: Layer, noise: bool, kernels: Kernels = HOST) -> FormedDelta:
        """Return the layer's ΔW with its sums (see :func:`svdrank.analysis.delta.form_delta`)."""


@dataclass(frozen=True)
class LayerSteps:
    """What computing one layer is, wherever it runs: form its ΔW, then decompose it.

    Attributes
    ----------
    form : callable
        ``form(layer, noise, kernels)``: the layer's
        :class:`~svdrank.analysis.delta.FormedDelta`, formed where ``kernels``
        run (see :class:`FormLayer`).
    analyze : callable
        Decomposes the formed layer (see :data:`AnalyzeLayer`).
    """

    form: FormLayer
    analyze: AnalyzeLayer

_Key = tuple[str, str, tuple[int, int]]


def alike_key(layer: Layer) -> _Key:
    """Return what makes layers alike for ``auto``'s hint: their stack, kind and shape."""
    return layer.stack, layer.kind, layer.shape


def needed_complete(spectrum: Spectrum) -> bool:
    """Whether a layer's spectrum decayed too slowly for a sketch (it went to Gram whole)."""
    return spectrum.engine == "gram" and spectrum.complete


@dataclass(frozen=True)
class Waves:
    """The layers a run computes, in submission order, each with its probe.

    Layers of the same stack, kind and shape tend to decay alike (all q_proj of
    a model, say). The first wave is one probe per such group, its first layer
    in order, decomposed with no hint; the second wave is every other layer,
    decomposed with ``expect_slow`` when its group's probe needed its complete
    spectrum (see :func:`svdrank.spectra.engines.decompose`). A layer's hint
    depends on its probe alone, so results do not depend on the number of
    workers, on timing or on which layers a resumed run already had.

    Attributes
    ----------
    order : tuple of int
        The indices to compute: the probes first, then the rest, each in layer order.
    probe_of : dict of int to int or None
        Each index's probe (None for a probe itself).
    known : dict of int to LayerResult
        The layers a resumed run already had (a probe among them hints from there).
    """

    order: tuple[int, ...]
    probe_of: Mapping[int, int | None]
    known: Mapping[int, LayerResult]


def two_waves(layers: Sequence[Layer], known: Mapping[int, LayerResult]) -> Waves:
    """Plan the layers not ``known`` in two waves: one probe per kind and shape, then the rest."""
    probes: dict[_Key, int] = {}
    for index, layer in enumerate(layers):
        probes.setdefault(alike_key(layer), index)
    firsts = set(probes.values())
    probe_of = {
        index: None if index in firsts else probes[alike_key(layer)]
        for index, layer in enumerate(layers)
        if index not in known
    }
    order = [index for index in probes.values() if index not in known]
    order += [index for index in probe_of if index not in firsts]
    return Waves(tuple(order), probe_of, known)


def forms_noise(settings: AnalysisSettings) -> bool:
    """Whether ΔW is formed with its rounding-noise bounds (every noise mode but ``off``)."""
    return settings.noise != "off"


def hinted(probe: LayerResult | None) -> bool:
    """Return the ``expect_slow`` hint a layer takes from its probe's result (none: a probe)."""
    return probe is not None and needed_complete(probe.spectrum)


class Runner(Protocol):
    """Computes a run's layers somewhere and yields each as it finishes."""

    def results(
        self,
        layers: Sequence[Layer],
        waves: Waves,
        settings: AnalysisSettings,
        steps: LayerSteps,
    ) -> Iterator[tuple[int, LayerResult]]:
        """Yield ``(index, result)`` for every index of ``waves.order``, in any order.

        Stopping the iteration early (an error, Ctrl-C) cancels what is left.
        """


@contextmanager
def runner_for(
    workers: int, device: str, cluster: str | None, files: Sequence[Path]
) -> Iterator[Runner]:
    """Choose where a run's layers are computed: the one place that decides it.

    Parameters
    ----------
    workers : int
        Layers decomposed at once in this process (a local run only).
    device : str
        The ``--device`` choice: resolved here for a local run, on each worker
        for a cluster (each uses its own GPU when it has one).
    cluster : str or None
        A Dask scheduler address, or ``local:N`` (see
        :func:`svdrank.analysis.cluster.dask_runner`); None runs locally.
    files : sequence of Path
        The checkpoint files the run reads: every worker of a cluster must see
        them as this process does (checked before anything is computed).

    Yields
    ------
    Runner
        Open for the run; a cluster started for it is closed on leaving.

    Raises
    ------
    UsageError
        For ``workers`` other than 1 with a cluster, a device this machine lacks
        (local run), or a cluster that cannot be reached or used.
    """
    if cluster is None:
        yield ThreadRunner(workers, kernels_for(device))
        return
    if workers != 1:
        raise UsageError(
            "--workers is for local runs; with --cluster every worker thread computes one "
            "layer at a time (size the cluster instead: local:N, or dask worker --nthreads)"
        )
    from svdrank.analysis.cluster import dask_runner

    with dask_runner(cluster, device, files) as runner:
        yield runner


class ThreadRunner:
    """Computes layers in threads of this process: one reader forms ΔW, ``workers`` decompose.

    At most ``workers`` updates are being decomposed and one more is being
    formed (the reader forms the next while workers decompose), so memory
    holds ``workers + 1`` layers' ΔW at the most: the device's memory, for
    torch kernels (ΔW is formed there). The second wave runs
    ``workers`` layers at once whatever their kind, each waiting in its worker
    for its probe if that is still running.

    Parameters
    ----------
    workers : int
        Layers decomposed at once (each with its own BLAS calls).
    kernels : Kernels
        Where the spectra are computed (see :func:`svdrank.spectra.devices.kernels_for`).
    """

    def __init__(self, workers: int, kernels: Kernels) -> None:
        self.workers = workers
        self.kernels = kernels

    def results(
        self,
        layers: Sequence[Layer],
        waves: Waves,
        settings: AnalysisSettings,
        steps: LayerSteps,
    ) -> Iterator[tuple[int, LayerResult]]:
        """Yield ``(index, result)`` of each layer of ``waves`` as it finishes.

        Parameters
        ----------
        layers : sequence of Layer
            Every layer of the run, in order.
        waves : Waves
            Which to compute, in which order, each hinted by which probe.
        settings : AnalysisSettings
        steps : LayerSteps
            How a layer is formed and decomposed.

        Yields
        ------
        tuple of (int, LayerResult)
        """
        if not waves.order:
            return
        noisy = forms_noise(settings)
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="svdrank-read")
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="svdrank-svd")
        running: dict[Future[LayerResult], int] = {}
        outcomes: dict[int, Future[LayerResult] | LayerResult] = dict(waves.known)
        order = waves.order
        try:
            next_read = reader.submit(steps.form, layers[order[0]], noisy, self.kernels)
            for position, index in enumerate(order):
                formed = next_read.result()
                while len(running) == self.workers:
                    yield from _finished(running)
                probe_index = waves.probe_of[index]
                probe = None if probe_index is None else outcomes[probe_index]
                task = pool.submit(
                    _analyze_alike,
                    steps.analyze,
                    (layers[index], formed, index, settings, self.kernels),
                    probe,
                )
                running[task] = index
                if probe_index is None:
                    outcomes[index] = task
                del formed
                if position + 1 < len(order):
                    next_read = reader.submit(
                        steps.form, layers[order[position + 1]], noisy, self.kernels
                    )
            while running:
                yield from _finished(running)
        finally:
            reader.shutdown(wait=False, cancel_futures=True)
            pool.shutdown(wait=False, cancel_futures=True)


def _finished(running: dict[Future[LayerResult], int]) -> Iterator[tuple[int, LayerResult]]:
    """Wait until a running layer finishes; yield each finished one (index, result), in order."""
    done, _ = wait(running, return_when=FIRST_COMPLETED)
    for task in sorted(done, key=running.__getitem__):
        yield running.pop(task), task.result()


def _analyze_alike(
    analyze: AnalyzeLayer,
    task: tuple[Layer, FormedDelta, int, AnalysisSettings, Kernels],
    probe: Future[LayerResult] | LayerResult | None,
) -> LayerResult:
    """Decompose one layer, hinted by its probe's outcome (waited for); a probe has none."""
    if isinstance(probe, Future):
        probe = probe.result()
    return analyze(*task, hinted(probe))


def progress_reporter(
    layers: Sequence[Layer], progress: Progress | None
) -> Callable[[Layer, LayerResult], None]:
    """Make a callback that counts finished layers and bytes and tells ``progress``.

    The callback takes each finished layer and its result, in the order they finish.
    """
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
