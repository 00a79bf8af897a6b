"""The results log of a ``diff`` (schema ``svdrank.resume/1``): finished layers, to resume from.

``OUTPUT.resume`` (``svdrank-analysis.json.resume`` by default) holds one JSON
object per line. The first is a header naming the run: the schema, the svdrank
version, each input's files (name, size, SHA-256 of the header, modification
time in whole seconds) and the settings. Each further line is one finished
layer: its index and the record the analysis file keeps for it. A line is
flushed and synced to disk as it is written, so a killed process or a lost
machine leaves every finished layer and at most one torn last line; reading
stops at the first line that does not hold a layer of this run, and that layer
and the ones after it are computed again.

The modification times tell apart two checkpoints with identical headers (two
saves of one training run: same names, shapes and offsets); a checkpoint moved
or copied with its times kept still resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

from svdrank._version import __version__
from svdrank.analysis.file import layer_record, settings_record
from svdrank.analysis.record import FieldError, layer_from_record
from svdrank.errors import CheckpointError, NumericalError, OutputError, UsageError
from svdrank.files import dumps, kind_of_path
from svdrank.inputs.checkpoint import Checkpoint, describe_input
from svdrank.types import AnalysisSettings, Layer, LayerResult

RESUME_SCHEMA = "svdrank.resume/1"
RESUME_SUFFIX = ".resume"
BAD_INPUT = (CheckpointError, NumericalError)
"""Errors of the inputs met while layers are computed: the log is removed, since a run of the
same inputs would meet them again (nothing to resume)."""


def results_log_path(output: Path) -> Path:
    """Return where the results log of the analysis file ``output`` lives: ``OUTPUT.resume``."""
    return output.with_name(output.name + RESUME_SUFFIX)


def run_header(
    base: Checkpoint, tuned: Checkpoint, settings: AnalysisSettings
) -> dict[str, Any]:
    """Make the header line of a run's results log: what must match for a run to resume it."""
    return {
        "schema": RESUME_SCHEMA,
        "svdrank_version": __version__,
        "inputs": {"base": _identity(base), "tuned": _identity(tuned)},
        "settings": settings_record(settings),
    }


def _identity(checkpoint: Checkpoint) -> list[dict[str, Any]]:
    """Each file of an input: name, size and header digest, and its modification time."""
    files = describe_input(checkpoint)["files"]
    return [
        {**item, "modified": int(file.stat().st_mtime)}
        for item, file in zip(files, checkpoint.files, strict=True)
    ]


class ResultsLog:
    """An open results log: the layers it already held, and appending the ones that finish.

    Parameters
    ----------
    path : Path or None
        The log file; None keeps no log (``append`` does nothing).
    stream : binary file or None
        The log opened for appending.
    known : dict of int to LayerResult
        The layers a resumed run found in the log, by index.
    """

    def __init__(
        self, path: Path | None, stream: BinaryIO | None, known: dict[int, LayerResult]
    ) -> None:
        self.path = path
        self.stream = stream
        self.known = known

    def append(self, index: int, result: LayerResult) -> None:
        """Write one finished layer as a line, flushed and synced before returning.

        Raises
        ------
        OutputError
            If the line cannot be written (full disk, lost file system).
        """
        if self.stream is not None:
            _write_line(self.stream, {"index": index, "layer": layer_record(result)}, self.path)


@contextmanager
def open_results_log(
    path: Path | None, header: dict[str, Any], layers: Sequence[Layer], resume: bool
) -> Iterator[ResultsLog]:
    """Open a run's results log: continue it with ``resume``, else start it afresh.

    Parameters
    ----------
    path : Path or None
        The log file (see :func:`results_log_path`); None keeps no log.
    header : dict
        The run's header (see :func:`run_header`).
    layers : sequence of Layer
        The run's layers, in order: a logged layer must be the one at its index.
    resume : bool
        Continue the log at ``path`` when there is one, keeping its layers; a
        log without a whole header line (killed while starting) counts as none.
        Without it, a log already there is replaced.

    Yields
    ------
    ResultsLog
        Its ``known`` layers are those already logged (none without ``resume``).
        When the block raises one of :data:`BAD_INPUT`, the log is removed;
        after any other exception (Ctrl-C, a bug) it stays, to resume from.

    Raises
    ------
    UsageError
        With ``resume``, if the log is of another run (other inputs, settings or
        svdrank version) or is not a results log; the log is left as it is.
    OutputError
        If the log cannot be written.
    """
    if path is None:
        yield ResultsLog(None, None, {})
        return
    known, length = _read(path, header, layers) if resume and path.exists() else ({}, 0)
    stream = _open(path, header, length)
    try:
        with stream:
            yield ResultsLog(path, stream, known)
    except BAD_INPUT:
        path.unlink(missing_ok=True)
        raise


def _open(path: Path, header: dict[str, Any], length: int) -> BinaryIO:
    """Open the log to append after its first ``length`` bytes; write the header when 0.

    A header that cannot be written leaves no log behind.
    """
    try:
        stream = path.open("r+b" if length else "wb")
        stream.truncate(length)
        stream.seek(length)
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    if not length:
        try:
            _write_line(stream, header, path)
        except OutputError:
            stream.close()
            path.unlink(missing_ok=True)
            raise
    return stream


def remove_results_log(path: Path) -> None:
    """Remove a run's results log once its analysis file is written (no error if it is gone)."""
    path.unlink(missing_ok=True)


def _write_line(stream: BinaryIO, record: dict[str, Any], path: Path | None) -> None:
    """Append one compact JSON line, flushed and synced (a layer takes far longer than fsync)."""
    try:
        stream.write(dumps(record, indent=None).encode("utf-8"))
        stream.flush()
        os.fsync(stream.fileno())
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from None


def _read(
    path: Path, header: dict[str, Any], layers: Sequence[Layer]
) -> tuple[dict[int, LayerResult], int]:
    """Read a log's layers of this run; return them and the length of the lines they fill.

    A length of 0 means no whole header line: the log starts afresh.
    """
    kind = kind_of_path(path, UsageError)
    if kind != "file":
        raise UsageError(f"{path}: is {kind}, not a results log; remove it or run without --resume")
    try:
        lines = path.read_bytes().split(b"\n")[:-1]
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not lines:
        return {}, 0
    _check_header(path, _parse(lines[0]), header)
    known: dict[int, LayerResult] = {}
    length = len(lines[0]) + 1
    for line in lines[1:]:
        found = _layer_of(_parse(line), layers, known)
        if found is None:
            break
        known[found[0]] = found[1]
        length += len(line) + 1
    return known, length


def _parse(line: bytes) -> Any:
    """Decode one line's JSON; None when it is not JSON (a torn or garbled line)."""
    try:
        return json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None


def _refuse_constant(name: str) -> Any:
    """Refuse NaN and Infinity, which no line of a log holds."""
    raise ValueError(f"{name} is not a JSON number")


def _check_header(path: Path, stored: Any, header: dict[str, Any]) -> None:
    """Refuse a log whose header is not this run's, naming what differs."""
    if not isinstance(stored, dict) or stored.get("schema") != RESUME_SCHEMA:
        raise UsageError(
            f"{path}: not a results log of schema {RESUME_SCHEMA!r}; remove it or run "
            "without --resume"
        )
    expected = json.loads(dumps(header))
    differences = []
    if stored.get("svdrank_version") != expected["svdrank_version"]:
        differences.append(
            f"svdrank {stored.get('svdrank_version')!r:.40} wrote it, this is {__version__}"
        )
    inputs = stored.get("inputs")
    differences += [
        f"the {side} checkpoint differs (its files, sizes, headers or modification times)"
        for side in ("base", "tuned")
        if not isinstance(inputs, dict) or inputs.get(side) != expected["inputs"][side]
    ]
    differences += _settings_differences(stored.get("settings"), expected["settings"])
    if differences:
        raise UsageError(
            f"{path}: the results log is of another run ({'; '.join(differences)}); run "
            "without --resume to start over"
        )


def _settings_differences(stored: Any, expected: dict[str, Any]) -> list[str]:
    """Name each setting whose logged value is not this run's."""
    stored = stored if isinstance(stored, dict) else {}
    return [
        f"{name} was {stored.get(name)!r:.40}, now {value!r:.40}"
        for name, value in expected.items()
        if stored.get(name) != value
    ]


def _layer_of(
    stored: Any, layers: Sequence[Layer], known: dict[int, LayerResult]
) -> tuple[int, LayerResult] | None:
    """Read one layer line: its index and result, or None when it is not a new layer of the run.

    The runtime target is the current run's (from the model's ``config.json``,
    which the header does not cover).
    """
    if not isinstance(stored, dict):
        return None
    index = stored.get("index")
    if type(index) is not int or not 0 <= index < len(layers) or index in known:
        return None
    try:
        result = layer_from_record(stored.get("layer"), index)
    except FieldError:
        return None
    if result.module != layers[index].module:
        return None
    return index, replace(result, target=layers[index].target)
