"""The safetensors header, validated by the rules of the reference implementation.

A file is 8 bytes of little-endian header length N, N bytes of UTF-8 JSON
starting with ``{``, then the data buffer. The reference (the ``safetensors``
Rust crate that every Python binding uses) refuses a header over 100 MB,
entries whose dtype is unknown, whose shape is not a list of non-negative
integers or whose byte size does not match their ``data_offsets``, counts
beyond 64 bits, strings that are not Unicode (lone surrogate escapes), and
offsets that are not contiguous from 0 to the end of the buffer (in any order
of the entries). svdrank refuses the same files, plus duplicate names (which
JSON parsers resolve silently, each its own way) and a header that does not
start with ``{`` (the format requires it; the crate no longer checks), with the
file and the tensor named.
Messages quote header values escaped and cut short: one line, whatever the file holds.
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Any

from svdrank.errors import CheckpointError
from svdrank.types import TensorInfo

HEADER_SIZE_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"
COUNT_LIMIT = 2**64
"""Shapes, offsets and sizes are 64-bit unsigned integers in the reference."""

_BRIEF = reprlib.Repr()
_BRIEF.maxstring = 120


def parse_header(
    file: Path, header_bytes: bytes, data_bytes: int, itemsizes: dict[str, int]
) -> list[TensorInfo]:
    """Every tensor a header describes, after checking it as the reference does.

    Parameters
    ----------
    file : Path
        The file, for messages and for the TensorInfo records.
    header_bytes : bytes
        The N bytes after the length prefix.
    data_bytes : int
        Size of the data buffer: file size − 8 − N.
    itemsizes : dict
        Bytes per element of every known dtype name.

    Returns
    -------
    list of TensorInfo
        In header order, with absolute data offsets.

    Raises
    ------
    CheckpointError
        Naming the file (and the tensor) for any rule broken.
    """
    header = _decode(file, header_bytes)
    data_start = HEADER_SIZE_BYTES + len(header_bytes)
    _check_metadata(file, header.pop(METADATA_KEY, None))
    spans = []
    for name, entry in header.items():
        dtype, shape, (begin, end) = _entry(file, name, entry, itemsizes)
        spans.append((begin, end, name, dtype, shape))
    _check_contiguous(file, spans, data_bytes)
    return [
        TensorInfo(name, shape, dtype, end - begin, file, data_start + begin)
        for begin, end, name, dtype, shape in spans
    ]


def _decode(file: Path, header_bytes: bytes) -> dict[str, Any]:
    """Decode the header's JSON object; names must be unique and numbers finite."""
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{file}: not a safetensors file (header is not UTF-8)") from None
    if not text.startswith("{"):
        raise CheckpointError(f"{file}: not a safetensors file (header does not start with '{{')")
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{file}: not a safetensors file (invalid header JSON: {exc})"
        ) from None
    except ValueError:
        raise CheckpointError(f"{file}: header holds a number too long to be read") from None
    except RecursionError:
        raise CheckpointError(f"{file}: header JSON is nested too deeply") from None
    except _DuplicateKey as exc:
        raise CheckpointError(f"{file}: header names {exc} twice") from None
    except _Constant as exc:
        raise CheckpointError(f"{file}: header holds {exc}, which is not a JSON number") from None
    except _NotUnicode as exc:
        raise CheckpointError(
            f"{file}: header holds the string {exc}, which is not Unicode (a lone surrogate)"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")
    return header


class _DuplicateKey(Exception):
    """A JSON object names one key twice."""


class _Constant(Exception):
    """NaN or Infinity, which JSON does not have."""


class _NotUnicode(Exception):
    r"""A string escape such as ``\ud800`` that decodes to a lone surrogate."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, refusing a key given twice or a key or string value not Unicode."""
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(_BRIEF.repr(key))
        for text in (key, value) if isinstance(value, str) else (key,):
            if not _is_unicode(text):
                raise _NotUnicode(_BRIEF.repr(text))
        record[key] = value
    return record


def _is_unicode(text: str) -> bool:
    """Tell whether a string encodes to UTF-8 (JSON escapes can make lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _no_constant(name: str) -> Any:
    """Refuse NaN and Infinity, which Python's json accepts and JSON does not."""
    raise _Constant(name)


def _check_metadata(file: Path, metadata: Any) -> None:
    """``__metadata__`` is absent, null (as the reference allows) or a map of strings to strings."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise CheckpointError(f"{file}: {METADATA_KEY} must map strings to strings")


def _entry(
    file: Path, name: str, entry: Any, itemsizes: dict[str, int]
) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """dtype, shape and (begin, end) of one tensor, each checked."""
    where = f"{file}: tensor {_BRIEF.repr(name)}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{where}: needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in itemsizes:
        known = ", ".join(itemsizes)
        raise CheckpointError(f"{where}: unsupported dtype {_shown(dtype)} (known: {known})")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise CheckpointError(
            f"{where}: shape {_BRIEF.repr(shape)} is not a list of 64-bit integers ≥ 0"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise CheckpointError(
            f"{where}: data_offsets {_BRIEF.repr(offsets)} are not two 64-bit integers ≥ 0"
        )
    begin, end = offsets
    size = _byte_size(shape, itemsizes[dtype])
    if size is None:
        raise CheckpointError(f"{where}: shape {_BRIEF.repr(shape)} is too large for 64-bit sizes")
    if end - begin != size:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] do not fit its shape {_BRIEF.repr(shape)} "
            f"and dtype {dtype}"
        )
    return dtype, tuple(shape), (begin, end)


def _is_count(value: Any) -> bool:
    """Tell whether a value is a JSON integer from 0 to 2⁶⁴ − 1 (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < COUNT_LIMIT


def _byte_size(shape: list[int], itemsize: int) -> int | None:
    """Bytes of a tensor, or None where the reference's 64-bit count of elements or bits overflows.

    Stopping at the first overflow, as the reference does, also keeps a header of
    many huge dimensions from multiplying numbers of millions of digits.
    """
    count = 1
    for dim in shape:
        count *= dim
        if count >= COUNT_LIMIT:
            return None
    return count * itemsize if count * itemsize * 8 < COUNT_LIMIT else None


def _shown(value: Any) -> str:
    """Render a header value for a one-line message: a short plain string as is, else escaped."""
    if isinstance(value, str) and value.isprintable() and len(value) <= _BRIEF.maxstring:
        return value
    return _BRIEF.repr(value)


def _check_contiguous(
    file: Path, spans: list[tuple[int, int, str, str, tuple[int, ...]]], data_bytes: int
) -> None:
    """Check that the data offsets tile the buffer from 0 to its end, no gap, no overlap."""
    position = 0
    for begin, end, name, _, _ in sorted(spans):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap"
            raise CheckpointError(
                f"{file}: tensor {_BRIEF.repr(name)}: data_offsets [{begin}, {end}] {problem}"
            )
        position = end
    if position > data_bytes:
        raise CheckpointError(
            f"{file}: truncated (tensor data needs {position} bytes, the file has {data_bytes})"
        )
    if position < data_bytes:
        raise CheckpointError(
            f"{file}: {data_bytes - position} bytes after the last tensor's data "
            "(the safetensors format allows none)"
        )
