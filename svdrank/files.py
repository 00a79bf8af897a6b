"""Files at the edges: inputs opened without blocking, outputs written atomically.

Every input is checked to be a regular file (after symlinks) and opened with
``O_NONBLOCK``: a FIFO, socket or device named like a checkpoint, a dangling or
looping symlink, or an unreadable file is one line, never a hang or a
traceback. Readers of the outputs (a training job, CI) never see half a file,
and a failed or interrupted command leaves the previous file, if any, as it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from svdrank.errors import OutputError, SvdrankError, UsageError

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def kind_of_path(path: Path, error: type[SvdrankError]) -> str:
    """Tell what is at ``path``, following symlinks: ``file``, ``directory`` or a description.

    Raises
    ------
    SvdrankError
        ``error`` for a missing path, a dangling or looping symlink, or one that
        cannot be examined.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise error(f"{path}: a symlink whose target does not exist") from None
        raise error(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise error(f"{path}: cannot be examined ({_reason(exc)})") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (after symlinks); never raises."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def open_regular(path: Path, error: type[SvdrankError]) -> BinaryIO:
    """Open a regular file for reading, without blocking on anything else.

    Raises
    ------
    SvdrankError
        ``error`` with one line for a missing file, a dangling or looping
        symlink, a FIFO, socket, device or directory, or no read permission.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        missing = "a symlink whose target does not exist" if path.is_symlink() else "no such file"
        raise error(f"{path}: {missing}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be opened ({_reason(exc)})") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise error(f"{path}: is {kind}, not a regular file")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def read_text(path: Path, error: type[SvdrankError]) -> str:
    """Read a regular file's UTF-8 text; fail with ``error`` and one line."""
    with open_regular(path, error) as handle:
        try:
            return handle.read().decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"{path}: not UTF-8 text") from None
        except OSError as exc:
            raise error(f"{path}: cannot be read ({_reason(exc)})") from None


def _reason(exc: OSError) -> str:
    """Give the OS's words for an error, with the looping-symlink case made plain."""
    if exc.errno == errno.ELOOP:
        return "a symlink loop"
    return exc.strerror or str(exc)


def read_json_object(path: Path, what: str, error: type[SvdrankError]) -> dict[str, Any]:
    """Read the JSON object stored in ``path``; fail with one line naming the file.

    Parameters
    ----------
    path : Path
    what : str
        What the file should be, for the message (``"analysis file"``).
    error : type of SvdrankError
        The error raised for a missing, unreadable, non-JSON or non-object file.

    Returns
    -------
    dict
        The decoded object.

    Raises
    ------
    SvdrankError
        An ``error`` instance, if the path is a folder, is missing or unreadable,
        does not hold JSON, or holds JSON that is not an object.
    """
    text = read_text(path, error)
    try:
        record = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise error(f"{path}: not a readable {what} ({exc})") from None
    except RecursionError:
        raise error(f"{path}: not a readable {what} (JSON nested too deeply)") from None
    if not isinstance(record, dict):
        raise error(f"{path}: not a {what} (the JSON is not an object)")
    return record


def _refuse_constant(name: str) -> Any:
    """Refuse NaN and Infinity, which Python's json reads and JSON does not have."""
    raise ValueError(f"{name} is not a JSON number")


def dumps(record: dict[str, Any], indent: int | None = 2) -> str:
    """Strict JSON (no NaN or Infinity) with a trailing newline; compact when indent is None."""
    separators = (",", ":") if indent is None else None
    return json.dumps(record, indent=indent, separators=separators, allow_nan=False) + "\n"


def check_writable(path: Path) -> None:
    """Fail before the long work when the output could not be written.

    Raises
    ------
    UsageError
        If the folder does not exist, is not writable, or the path is a folder.
    """
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; give a file name for the output")
    if not folder.is_dir():
        raise UsageError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{path}: folder {folder} is not writable")


def write_atomically(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename: readers never see half of it.

    Raises
    ------
    UsageError
        If the folder does not exist or the path is a folder.
    OutputError
        If writing fails (read-only folder, full disk, …); nothing is left behind.
    """
    write_files_atomically({path: lambda stream: stream.write(text.encode("utf-8"))})


def write_files_atomically(writers: Mapping[Path, Callable[[BinaryIO], object]]) -> list[Path]:
    """Write several files as one: all of them appear, or none does.

    Each file is written by its writer into a temporary file beside it, synced,
    and renamed into place only once every file is complete; a failure
    anywhere removes every temporary file and leaves existing files as they
    were.

    Parameters
    ----------
    writers : mapping of Path to callable
        For each destination, a function that writes the content to a binary stream.

    Returns
    -------
    list of Path
        The destinations, in order.

    Raises
    ------
    UsageError
        If a destination's folder does not exist or the destination is a folder.
    OutputError
        If writing fails (read-only folder, full disk, …).
    """
    temporaries: dict[Path, Path] = {}
    current = Path(".")
    try:
        for current, write in writers.items():
            check_writable(current)
            temporaries[current] = _write_temporary(current, write)
        for current, temporary in temporaries.items():
            os.replace(temporary, current)
    except OSError as exc:
        raise OutputError(f"{current}: cannot be written ({_reason(exc)})") from None
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
    return list(writers)


def _write_temporary(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write one file's content to a synced temporary file beside it; return that file."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


@contextmanager
def output_directory(directory: Path) -> Iterator[Path]:
    """Provide ``directory`` as a folder to write into, removed again if new and the writing fails.

    Raises
    ------
    UsageError
        If the path exists and is not a folder.
    OutputError
        If the folder cannot be created.
    """
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory}: exists and is not a folder; give a folder for the output")
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{directory}: cannot be created ({_reason(exc)})") from None
    try:
        yield directory
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise


def _umask() -> int:
    """Return the process umask (reading it means setting it; put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
