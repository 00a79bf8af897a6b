"""Read safetensors checkpoints lazily: headers first, one tensor at a time on demand.

A checkpoint is a single ``.safetensors`` file, a directory of shards (with or
without ``model.safetensors.index.json``) or the index file itself. Only the
JSON headers are parsed up front; tensor bytes are memory-mapped and widened to
float32 (float64 for F64) one tensor at a time, so reading a layer touches only
that layer's pages.

We parse the format ourselves rather than through ``safetensors.safe_open``
because its NumPy front end has no BF16 or F8 and its errors do not name the
problem precisely enough for a one-line message.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from svdrank.errors import CheckpointError
from svdrank.files import is_regular_file, kind_of_path, open_regular, read_json_object
from svdrank.inputs.header import HEADER_SIZE_BYTES, MAX_HEADER_BYTES, parse_header
from svdrank.types import TensorInfo

INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
"""How each safetensors dtype is stored (which of them are floating: types.FLOATING_DTYPES)."""


@dataclass(frozen=True)
class Checkpoint:
    """The tensors of a checkpoint, from headers alone, and lazy access to their values.

    Parameters
    ----------
    path : Path
        What the user named: a file, a directory or an index file.
    files : tuple of Path
        The safetensors files that hold the tensors.
    tensors : dict
        ``name -> TensorInfo`` in file order.
    """

    path: Path
    files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(info.nbytes for info in self.tensors.values())

    def read(self, name: str) -> np.ndarray:
        """Return one tensor widened to float32 (float64 when stored as F64).

        Only the tensor's own bytes are mapped, so memory grows by the size of
        this tensor, not of the file. Integer and bool tensors are returned as
        stored.

        Raises
        ------
        CheckpointError
            If ``name`` is not in the checkpoint or its bytes cannot be read.
        """
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return read_tensor(self.tensors[name])


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Map one tensor's bytes and decode them (see :meth:`Checkpoint.read`)."""
    stored = read_tensor_view(info)
    if not info.floating:
        return np.array(stored)
    wide = np.float64 if info.dtype == "F64" else np.float32
    return stored.astype(wide)


def read_tensor_view(info: TensorInfo) -> np.ndarray:
    """Map one tensor read-only in its stored dtype (mmap, no copy).

    Pages are read from disk only when touched; the mapping is released when
    the last array referring to it goes away.

    Parameters
    ----------
    info : TensorInfo
        The tensor's file, dtype, shape and byte range, from its header.

    Returns
    -------
    ndarray
        A read-only array of ``info.shape`` in the NumPy dtype of ``info.dtype``
        (``ml_dtypes.bfloat16`` for BF16).

    Raises
    ------
    CheckpointError
        If the file cannot be opened or mapped.
    """
    if info.nbytes == 0:
        return np.zeros(info.shape, dtype=DTYPES[info.dtype])
    granularity = mmap.ALLOCATIONGRANULARITY
    aligned = info.start - info.start % granularity
    try:
        with open_regular(info.file, CheckpointError) as handle:
            mapped = mmap.mmap(
                handle.fileno(),
                length=info.start - aligned + info.nbytes,
                offset=aligned,
                access=mmap.ACCESS_READ,
            )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{info.file}: cannot map tensor {info.name!r}: {exc}") from exc
    whole = np.frombuffer(mapped, dtype=np.uint8)  # its base is the mmap: see forget_pages
    raw = whole[info.start - aligned : info.start - aligned + info.nbytes]
    return raw.view(DTYPES[info.dtype]).reshape(info.shape)


def forget_pages(view: np.ndarray) -> None:
    """Drop the pages under a slice of a mapped tensor from this process's memory.

    Touched pages of a mapping count in the resident size until it is unmapped;
    once a chunk of a tensor has been consumed, ``MADV_DONTNEED`` returns its
    pages (they stay in the page cache, and would be read back from the file if
    touched again). Does nothing for arrays that are not mmap views, or where
    the platform lacks ``madvise``.
    """
    whole: object = view
    mapping: mmap.mmap | None = None
    while isinstance(whole, np.ndarray) and (mapping := _mapping(whole)) is None:
        whole = whole.base
    if mapping is None or not isinstance(whole, np.ndarray):
        return
    if not hasattr(mmap, "MADV_DONTNEED") or not view.size:
        return
    offset = view.__array_interface__["data"][0] - whole.__array_interface__["data"][0]
    start = offset - offset % mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, start, offset + view.nbytes - start)


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    """Find the mmap an array was made from by ``np.frombuffer`` (directly or via memoryview)."""
    base = array.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint from its headers: a file, a shard directory or an index file.

    Parameters
    ----------
    path : str or Path
        A ``.safetensors`` file, a directory holding one or more of them (with
        an optional ``*.safetensors.index.json``), or the index file itself.

    Returns
    -------
    Checkpoint

    Raises
    ------
    CheckpointError
        For a missing path, a pickle checkpoint, a corrupt or truncated file,
        an index naming a missing shard, or a tensor named in two shards.
    """
    path = Path(path)
    kind = kind_of_path(path, CheckpointError)
    weight_map: dict[str, str] = {}
    index = path
    if kind == "directory":
        files, weight_map, index = _files_of_directory(path)
    elif kind != "file":
        raise CheckpointError(f"{path}: is {kind}, not a checkpoint file or directory")
    elif path.name.endswith(INDEX_SUFFIX) or path.suffix == ".json":
        files, weight_map = _files_of_index(path)
    else:
        _refuse_pickle(path)
        files = (path,)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for info in read_header(file):
            if info.name in tensors:
                raise CheckpointError(
                    f"{path}: tensor {info.name!r} appears in both "
                    f"{tensors[info.name].file.name} and {file.name}"
                )
            tensors[info.name] = info
    _check_weight_map(index, weight_map, tensors)
    return Checkpoint(path=path, files=files, tensors=tensors)


def _check_weight_map(
    index: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]
) -> None:
    """Check that every tensor an index names is in the shard it names."""
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != shard:
            found = "in no shard" if info is None else f"in {info.file.name}"
            raise CheckpointError(
                f"{index}: weight_map puts {name!r} in {shard}, but it is {found}"
            )


def _refuse_pickle(path: Path) -> None:
    """Refuse pickle checkpoints: unpickling runs arbitrary code."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints are refused (svdrank reads safetensors only and "
            "never unpickles); convert it to .safetensors first"
        )


def _files_of_directory(directory: Path) -> tuple[tuple[Path, ...], dict[str, str], Path]:
    """Find the shards of a directory: those its index names, else every .safetensors file.

    Returns the shards, the index's weight_map (empty without an index) and the
    index file (the directory without one), which messages about the map name.

    Only regular files count (after symlinks): a FIFO or a folder named
    ``x.safetensors`` is not a shard, and an index that is not a regular file
    is refused.
    """
    entries = _entries(directory)
    indexes = [entry for entry in entries if entry.name.endswith(INDEX_SUFFIX)]
    for index in indexes:
        kind = kind_of_path(index, CheckpointError)
        if kind != "file":
            raise CheckpointError(f"{index}: is {kind}, not an index file")
    if len(indexes) > 1:
        names = ", ".join(index.name for index in indexes)
        raise CheckpointError(f"{directory}: several index files ({names}); name one of them")
    if indexes:
        return (*_files_of_index(indexes[0]), indexes[0])
    files = tuple(p for p in entries if p.name.endswith(".safetensors") and is_regular_file(p))
    if files:
        return files, {}, directory
    pickles = [p.name for p in entries if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        _refuse_pickle(directory / pickles[0])
    raise CheckpointError(f"{directory}: no .safetensors files in this directory")


def _entries(directory: Path) -> list[Path]:
    """List a directory, sorted; one line if it cannot be read (no permission, removed)."""
    try:
        return sorted(directory.iterdir())
    except OSError as exc:
        raise CheckpointError(f"{directory}: cannot be listed ({exc.strerror or exc})") from None


def _files_of_index(index: Path) -> tuple[tuple[Path, ...], dict[str, str]]:
    """Read an index: its shard files (each a regular file beside it) and its weight_map."""
    record = read_json_object(index, "safetensors index", CheckpointError)
    weight_map = record.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' is missing, empty or not an object")
    files = []
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{index}: weight_map gives {name!r} the shard {shard!r}; "
                "a shard is a file name beside the index"
            )
    for shard in dict.fromkeys(weight_map.values()):
        file = index.parent / shard
        if not file.exists() and not file.is_symlink():
            raise CheckpointError(f"{index}: names shard {shard!r}, which does not exist")
        kind = kind_of_path(file, CheckpointError)
        if kind != "file":
            raise CheckpointError(f"{index}: names shard {shard!r}, which is {kind}")
        files.append(file)
    return tuple(files), weight_map


def read_header(file: Path) -> list[TensorInfo]:
    """Parse and validate one safetensors header without reading tensor data.

    Parameters
    ----------
    file : Path
        A regular file (checked: a FIFO or device is refused, never read).

    Returns
    -------
    list of TensorInfo
        The tensors it holds, in header order.

    Raises
    ------
    CheckpointError
        If the file is not a readable regular file, is empty, truncated, not
        safetensors, or its header breaks a rule of the format (see
        :mod:`svdrank.inputs.header`).
    """
    with open_regular(file, CheckpointError) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise CheckpointError(f"{file}: empty file")
        if size < HEADER_SIZE_BYTES:
            raise CheckpointError(f"{file}: truncated ({size} bytes, shorter than a header)")
        (header_len,) = struct.unpack("<Q", handle.read(HEADER_SIZE_BYTES))
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{file}: header length {header_len} is over the format's limit of "
                f"{MAX_HEADER_BYTES} bytes (not a safetensors file?)"
            )
        if header_len > size - HEADER_SIZE_BYTES:
            raise CheckpointError(
                f"{file}: not a safetensors file or truncated (header length {header_len} "
                f"exceeds the file size {size})"
            )
        header_bytes = handle.read(header_len)
    data_bytes = size - HEADER_SIZE_BYTES - header_len
    itemsizes = {name: dtype.itemsize for name, dtype in DTYPES.items()}
    return parse_header(file, header_bytes, data_bytes, itemsizes)


def describe_input(checkpoint: Checkpoint) -> dict[str, Any]:
    """Path, files, sizes and header digests of one input, for the analysis file."""
    return {
        "path": str(checkpoint.path),
        "bytes": checkpoint.nbytes,
        "files": [
            {"name": file.name, "bytes": file.stat().st_size, "header_sha256": header_sha256(file)}
            for file in checkpoint.files
        ],
    }


def header_sha256(file: Path) -> str:
    """SHA-256 of a file's length prefix and JSON header: identifies it without reading data."""
    with open_regular(file, CheckpointError) as handle:
        prefix = handle.read(HEADER_SIZE_BYTES)
        (header_len,) = struct.unpack("<Q", prefix)
        return hashlib.sha256(prefix + handle.read(header_len)).hexdigest()
