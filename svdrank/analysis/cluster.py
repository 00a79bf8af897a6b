"""Layers computed on a Dask cluster: one task per layer, the worker reads its own inputs.

Each task is one layer: the worker opens the checkpoint files itself (from
storage every worker sees at the same path), forms ΔW, decomposes it with the
same engines and seeds as a local run and returns only the
:class:`~svdrank.types.LayerResult`; ΔW never travels. The two waves of
:func:`svdrank.analysis.runners.two_waves` are kept: the probes are
submitted first, and every other layer once its probe's result is back
here, with that result as a plain argument, so its hint is the same as a
local run's whatever the number of workers, and the first free worker takes
it.

Dask recomputes the tasks of a worker that is lost (and a probe's result that
was kept there); a layer whose workers die ``allowed-failures`` times over
(Dask's default: 3), most likely for want of memory, stops the run with one
line. An error in a layer stops the run and cancels the tasks left.

Extraction's tasks (:mod:`svdrank.analysis.extract_cluster`) run through
the same :class:`DaskRunner`: one pass in the same two waves
(:meth:`DaskRunner.in_waves`), the factors of a whole analysis all at once
(:meth:`DaskRunner.each`).

Dask is an optional extra (``pip install 'svdrank[cluster]'``) and is
imported only here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from uuid import uuid4

from svdrank._version import __version__
from svdrank.analysis.runners import LayerSteps, Waves, forms_noise, hinted
from svdrank.errors import CheckpointError, UsageError
from svdrank.inputs.checkpoint import header_sha256
from svdrank.spectra.devices import Kernels, kernels_for
from svdrank.types import DEVICES, AnalysisSettings, Layer, LayerResult, check_choice

CLUSTER_EXTRA = "pip install 'svdrank[cluster]'"
"""How to get Dask for ``--cluster``."""
LOCAL_PREFIX = "local:"
"""``local:N``: a cluster of N worker processes on this machine, started for the run."""
CONNECT_SECONDS = 30
"""How long to wait for a scheduler to answer and for its first worker to join."""


@contextmanager
def dask_runner(address: str, device: str, files: Sequence[Path]) -> Iterator[DaskRunner]:
    """Connect to a Dask cluster (or start one on this machine) and check its workers.

    Parameters
    ----------
    address : str
        A scheduler's address (``tcp://host:8786``, or any address Dask's
        ``Client`` takes), or ``local:N``: a ``LocalCluster`` of N worker
        processes of one thread each, started for the run and closed after it,
        each with a memory limit of this machine's memory / N (a layer that
        does not fit kills its worker instead of swapping).
    device : str
        The ``--device`` choice, resolved on each worker.
    files : sequence of Path
        The checkpoint files of the run: every worker must see each one at
        the same absolute path with the same header.

    Yields
    ------
    DaskRunner
        Its client closes on leaving (a scheduler at an address stays up).

    Raises
    ------
    UsageError
        Without Dask installed, for an address that is not ``local:N`` with
        N ≥ 1 and where no scheduler answers, a scheduler without workers, or
        a worker that runs another svdrank version or does not see a file as
        this process does (named with the worker).
    """
    check_choice(device, DEVICES, "device")
    distributed = _import_distributed()
    with _client(distributed, address) as client:
        check_workers_see(client, files)
        yield DaskRunner(client, device, distributed)


def _import_distributed() -> Any:
    """Import Dask's distributed scheduler, or say how to install it."""
    try:
        import distributed
    except ImportError:
        raise UsageError(f"--cluster needs Dask's distributed scheduler: {CLUSTER_EXTRA}") from None
    return distributed


@contextmanager
def _client(distributed: Any, address: str) -> Iterator[Any]:
    """Open a client of the scheduler at ``address``, or of a LocalCluster for ``local:N``."""
    workers = local_workers(address)
    if workers is None:
        with _connect(distributed, address) as client:
            yield client
        return
    with distributed.LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=distributed.system.MEMORY_LIMIT // workers,
        dashboard_address=":0",
        silence_logs=logging.CRITICAL,
    ) as cluster, distributed.Client(cluster, set_as_default=False) as client:
        yield client


def local_workers(address: str) -> int | None:
    """Return N of ``local:N``; None for a scheduler's address.

    Raises
    ------
    UsageError
        If the address starts with ``local:`` but N is not an integer ≥ 1.
    """
    if not address.startswith(LOCAL_PREFIX):
        return None
    count = address.removeprefix(LOCAL_PREFIX)
    if not count.isdigit() or int(count) < 1:
        raise UsageError(f"--cluster {address}: local:N takes a number of workers N ≥ 1")
    return int(count)


@contextmanager
def _connect(distributed: Any, address: str) -> Iterator[Any]:
    """Connect to a running scheduler and wait for a worker; one line when either fails."""
    try:
        distributed.comm.get_address_host_port(address)
    except ValueError as exc:
        # Checked first: a Client made from such an address hangs for a minute when collected.
        raise UsageError(
            f"--cluster {address}: give a scheduler's address, tcp://HOST:PORT, or local:N ({exc})"
        ) from None
    try:
        client = distributed.Client(address, timeout=CONNECT_SECONDS, set_as_default=False)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(
            f"--cluster {address}: no Dask scheduler answered there ({' '.join(str(exc).split())})"
        ) from None
    with client:
        try:
            client.wait_for_workers(1, timeout=CONNECT_SECONDS)
        except TimeoutError:
            raise UsageError(
                f"--cluster {address}: the scheduler has no workers (none joined in "
                f"{CONNECT_SECONDS} s); start some with `dask worker {address}`"
            ) from None
        yield client


def check_workers_see(client: Any, files: Sequence[Path]) -> None:
    """Refuse a cluster where some worker does not see the run's files as this process does.

    Runs :func:`worker_view` on every worker and compares each file's header
    digest (SHA-256 of the safetensors header: names, shapes, offsets) with
    the one read here, and the svdrank version with this one.

    Raises
    ------
    UsageError
        Naming the first worker and file that differ (or are missing there).
    """
    paths = [str(file.absolute()) for file in files]
    expected = {path: header_sha256(Path(path)) for path in paths}
    for worker, (version, digests) in sorted(client.run(worker_view, paths).items()):
        if version != __version__:
            raise UsageError(
                f"--cluster: worker {worker} runs svdrank {version}, this is {__version__}; "
                "install the same version on every worker"
            )
        for path in paths:
            if digests[path] != expected[path]:
                seen = "cannot read" if digests[path] is None else "sees another file at"
                raise UsageError(
                    f"--cluster: worker {worker} {seen} {path}; every worker must read the "
                    "same checkpoints at the same paths (a shared file system or identical copies)"
                )


def worker_view(paths: list[str]) -> tuple[str, dict[str, str | None]]:
    """Return, on a worker, its svdrank version and each file's header digest (None: unreadable)."""
    return __version__, {path: _header_digest(Path(path)) for path in paths}


def _header_digest(file: Path) -> str | None:
    """Return the file's header digest, or None when it is missing or no safetensors file."""
    try:
        return header_sha256(file)
    except CheckpointError:
        return None


class DaskRunner:
    """Computes each layer as one task on a Dask cluster's workers.

    Parameters
    ----------
    client : distributed.Client
        Connected to the cluster (see :func:`dask_runner`).
    device : str
        The ``--device`` choice, resolved on each worker.
    distributed : module
        Dask's ``distributed`` package.
    """

    def __init__(self, client: Any, device: str, distributed: Any) -> None:
        self.client = client
        self.device = device
        self.distributed = distributed

    @property
    def address(self) -> str:
        """The scheduler's address: another client of the same cluster connects there."""
        return str(self.client.scheduler.address)

    def results(
        self,
        layers: Sequence[Layer],
        waves: Waves,
        settings: AnalysisSettings,
        steps: LayerSteps,
    ) -> Iterator[tuple[int, LayerResult]]:
        """Submit a task per layer of ``waves``; yield ``(index, result)`` as each finishes.

        The probes are submitted first; every other layer once its probe's
        result (or the one a resumed run had) is here, with it as an argument
        (see :meth:`in_waves`). Leaving early (an error, Ctrl-C) cancels the
        tasks left.

        Parameters
        ----------
        layers : sequence of Layer
            Every layer of the run, in order.
        waves : Waves
            Which to compute, each hinted by which probe.
        settings : AnalysisSettings
        steps : LayerSteps
            How a worker forms and decomposes a layer.

        Yields
        ------
        tuple of (int, LayerResult)

        Raises
        ------
        UsageError
            When a layer's workers kept dying (most likely for want of memory).
        CheckpointError, NumericalError
            As a local run, from the worker that met them.
        """

        def task(layer: Layer, index: int) -> Callable[..., LayerResult]:
            return functools.partial(compute_layer, steps, layer, index, settings, self.device)

        return self.in_waves(layers, waves, task)

    def in_waves(
        self,
        layers: Sequence[Layer],
        waves: Waves,
        task: Callable[[Layer, int], Callable[..., Any]],
        hint: Callable[[Any], LayerResult] | None = None,
    ) -> Iterator[tuple[int, Any]]:
        """Run ``task(layer, index)(probe)`` for each layer of ``waves``; yield each outcome.

        ``layer`` has absolute paths; ``probe`` is None for a probe, else its
        probe's LayerResult (``hint(outcome)`` with ``hint``, else the outcome
        itself), or the result a resumed run had. The probes are submitted
        first; each other layer is submitted from here once its probe's
        outcome is back, with that result as a plain argument. Its task then
        depends on nothing, so the scheduler hands it to the first free
        worker (a task depending on a probe's future waits for the probe's
        worker instead, and the others idle: 10-15 % of a 28-layer run here).

        Parameters
        ----------
        layers : sequence of Layer
            Every layer of the run, in order.
        waves : Waves
            Which to compute, probes first, each hinted by which probe.
        task : callable
            Makes a layer's task body, called on a worker with its probe.
        hint : callable, optional
            The probe's LayerResult from its outcome.

        Yields
        ------
        tuple of (int, object)
            ``(index, outcome)`` as each task finishes, in any order; each
            outcome leaves the cluster once here. Leaving early (an error,
            Ctrl-C) cancels the tasks left.

        Raises
        ------
        UsageError
            When a layer's workers kept dying (most likely for want of memory).
        SvdrankError
            As a local run, from the worker that met it.
        """
        run = uuid4().hex[:8]
        tasks: dict[int, Any] = {}
        waiting: dict[int, list[int]] = {}
        for index in waves.order:
            probe = waves.probe_of[index]
            if probe is not None and probe not in waves.known:
                waiting.setdefault(probe, []).append(index)

        def submit(index: int, probe: LayerResult | None) -> Any:
            body = task(_absolute(layers[index]), index)
            tasks[index] = self._submit(body, f"layer-{index}-{run}", probe)
            return tasks[index]

        try:
            for index in waves.order:
                probe = waves.probe_of[index]
                if probe is None or probe in waves.known:
                    submit(index, None if probe is None else waves.known[probe])
            finished = self.distributed.as_completed(list(tasks.values()), loop=self.client.loop)
            indices = {future.key: index for index, future in tasks.items()}
            for future in finished:
                index = indices[future.key]
                outcome = self._result(future, layers[index])
                del tasks[index], future
                result = outcome if hint is None else hint(outcome)
                for other in waiting.pop(index, ()):
                    added = submit(other, result)
                    indices[added.key] = other
                    finished.add(added)
                yield index, outcome
        finally:
            self.client.cancel(list(tasks.values()))

    def each(
        self,
        layers: Sequence[Layer],
        task: Callable[[Layer, int], Callable[..., Any]],
        name: str,
    ) -> Iterator[tuple[int, Any]]:
        """Run ``task(layer, index)()`` for every layer at once; yield each outcome as it finishes.

        As :meth:`in_waves` for layers that depend on none other (``layer``
        has absolute paths; outcomes leave the cluster once here; leaving
        early cancels the rest). The tasks' keys start ``svdrank-{name}-``.
        """
        run = uuid4().hex[:8]
        tasks: dict[int, Any] = {}
        try:
            for index, layer in enumerate(layers):
                tasks[index] = self._submit(task(_absolute(layer), index), f"{name}-{index}-{run}")
            yield from self._finished(tasks, layers)
        finally:
            self.client.cancel(list(tasks.values()))

    def _submit(self, body: Callable[..., Any], key: str, *args: Any) -> Any:
        """Submit one task under an svdrank key (never merged with another run's)."""
        return self.client.submit(body, *args, key=f"svdrank-{key}", pure=False)

    def _finished(
        self, tasks: dict[int, Any], layers: Sequence[Layer]
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, outcome)`` of each task as it finishes, releasing it from ``tasks``."""
        indices = {task.key: index for index, task in tasks.items()}
        for task in self.distributed.as_completed(list(tasks.values()), loop=self.client.loop):
            index = indices[task.key]
            outcome = self._result(task, layers[index])
            del tasks[index], task
            yield index, outcome

    def _result(self, task: Any, layer: Layer) -> Any:
        """Return a finished task's outcome; a layer that kept killing its workers is one line."""
        try:
            return task.result()
        except self.distributed.KilledWorker:
            megabytes = layer.shape[0] * layer.shape[1] * 4 / 1e6
            raise UsageError(
                f"{layer.module}: the workers computing it died repeatedly, most likely out of "
                f"memory: its ΔW is {megabytes:.0f} MB in float32 and a worker thread needs "
                "about 3× that; give the workers more memory (see the README, Running on a "
                "cluster)"
            ) from None


def compute_layer(
    steps: LayerSteps,
    layer: Layer,
    index: int,
    settings: AnalysisSettings,
    device: str,
    probe: LayerResult | None,
) -> LayerResult:
    """Form and decompose one layer on a worker, hinted by its probe's result (a task's body)."""
    formed = steps.form(layer, forms_noise(settings), _kernels(device))
    return steps.analyze(layer, formed, index, settings, _kernels(device), hinted(probe))


@functools.cache
def _kernels(device: str) -> Kernels:
    """Return the worker's kernels for ``device``, resolved once per worker process."""
    return kernels_for(device)


def _absolute(layer: Layer) -> Layer:
    """Give the layer absolute file paths: a worker's working folder is not this one's."""
    return replace(
        layer,
        base=replace(layer.base, file=layer.base.file.absolute()),
        tuned=replace(layer.tuned, file=layer.tuned.file.absolute()),
    )
