"""Extraction on a Dask cluster: each layer's pass, or each layer's factors, is one task.

The workers read their own layers from the checkpoints (see
:mod:`svdrank.analysis.cluster`) and send back only a layer's result and its
stored factors (r·(m + n) values in the storage dtype); ΔW never travels. A
task computes what the local route computes, with the same code, seeds and
hints (a layer's pass waits for its group's probe as ``diff --cluster``'s
layers do), so the adapter is the local one's byte for byte. The outcomes
come back in any order: the factors are spooled as they arrive
(:class:`~svdrank.analysis.extract_pass.FactorSpool`) and handed to the writer
in the order it asks for; only the small results wait in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from svdrank.analysis.delta import form_delta
from svdrank.analysis.extract import Factored, FactorJob, FactorSettings, factor_update
from svdrank.analysis.extract_pass import FactorSpool, LayerPass, PassSteps, pass_layer
from svdrank.analysis.runners import forms_noise, hinted, progress_reporter, two_waves
from svdrank.types import Layer, LayerResult, Progress

if TYPE_CHECKING:
    from svdrank.analysis.cluster import DaskRunner


def passes_on(
    runner: DaskRunner, layers: Sequence[Layer], steps: PassSteps, progress: Progress | None
) -> Iterator[tuple[int, LayerPass]]:
    """Make each layer's pass a task, probes first; yield ``(index, pass)`` as each finishes.

    Parameters
    ----------
    runner : DaskRunner
        Connected to the cluster.
    layers : sequence of Layer
        In the analysis's order (placed in the model as ``analyze`` places them).
    steps : PassSteps
        The analysis settings, rank rule, scale and factor settings (pickled to the workers).
    progress : callable, optional
        Told after each layer, in the order they finish.

    Yields
    ------
    tuple of (int, LayerPass)
        The layer's index and what :func:`~svdrank.analysis.extract_pass.pass_layer` gave.

    Raises
    ------
    UsageError
        When a layer's workers kept dying (most likely for want of memory).
    NumericalError
        If ΔW holds NaN or Inf, or a factor overflows the storage dtype.
    """
    report = progress_reporter(layers, progress)

    def task(layer: Layer, index: int) -> Callable[[LayerResult | None], LayerPass]:
        return partial(pass_on_worker, steps, layer, index)

    for index, outcome in runner.in_waves(layers, two_waves(layers, {}), task, analysed):
        yield index, outcome
        report(layers[index], outcome[0])


def pass_on_worker(
    steps: PassSteps, layer: Layer, index: int, probe: LayerResult | None
) -> LayerPass:
    """Form a layer's ΔW and make its pass, hinted by its probe's result (a task's body)."""
    formed = form_delta(layer, forms_noise(steps.settings))
    return pass_layer(layer, formed, index, steps, hinted(probe))


def analysed(outcome: LayerPass) -> LayerResult:
    """Return a pass's analysis: all that the other layers of a probe's group need of it."""
    return outcome[0]


@contextmanager
def factors_on(
    runner: DaskRunner,
    jobs: Sequence[FactorJob],
    settings: FactorSettings,
    progress: Progress | None,
) -> Iterator[Iterator[Factored]]:
    """Factor every job as a task at once; yield an iterator of the factors in the jobs' order.

    Parameters
    ----------
    runner : DaskRunner
        Connected to the cluster.
    jobs : sequence of FactorJob
    settings : FactorSettings
    progress : callable, optional
        Told after each layer, in the order they finish.

    Yields
    ------
    iterator of Factored
        One per job, in order, read back from the spool (which closes on leaving).

    Raises
    ------
    UsageError
        When a layer's workers kept dying (most likely for want of memory).
    NumericalError
        If ΔW holds NaN or Inf, or a factor overflows the storage dtype.
    """
    layers = [job.layer for job in jobs]
    report = progress_reporter(layers, progress)

    def task(layer: Layer, index: int) -> Callable[[], Factored]:
        return partial(factor_on_worker, settings, replace(jobs[index], layer=layer))

    with FactorSpool(settings.dtype) as spool:
        for index, factored in runner.each(layers, task, "factors"):
            spool.add(layers[index].module, factored)
            report(layers[index], jobs[index].result)
        yield (spool.read(layer.module) for layer in layers)


def factor_on_worker(settings: FactorSettings, job: FactorJob) -> Factored:
    """Form a job's ΔW and factor it as the local route does (a task's body)."""
    rng = np.random.default_rng([settings.seed, job.index])
    return factor_update(form_delta(job.layer), job, settings, rng)
