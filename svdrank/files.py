"""Files at the edges: JSON objects read with one-line errors, outputs written atomically.

Readers (a training job, CI) never see half a file, and a failed or
interrupted command leaves the previous file, if any, as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from svdrank.errors import SvdrankError, UsageError


def read_json_object(path: Path, what: str, error: type[SvdrankError]) -> dict[str, Any]:
    """The JSON object stored in ``path``, or ``error`` with one line naming the file.

    Parameters
    ----------
    path : Path
    what : str
        What the file should be, for the message (``"analysis file"``).
    error : type of SvdrankError
        The error raised for a missing, unreadable, non-JSON or non-object file.
    """
    if path.is_dir():
        raise error(f"{path}: is a directory, not a {what}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{path}: not a readable {what} ({exc})") from None
    if not isinstance(record, dict):
        raise error(f"{path}: not a {what} (the JSON is not an object)")
    return record


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
    """Write a file through a temporary file and a rename: readers never see half of it."""
    check_writable(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (reading it means setting it; put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
