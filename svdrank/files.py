"""Writing outputs safely: refuse an unwritable path before the long work, then write atomically.

Readers (a training job, CI) never see half a file, and a failed or
interrupted command leaves the previous file, if any, as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from svdrank.errors import UsageError


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
