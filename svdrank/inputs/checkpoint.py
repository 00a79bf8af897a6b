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
import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from svdrank.errors import CheckpointError
from svdrank.types import TensorInfo

HEADER_SIZE_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024
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
    """A read-only view of one tensor in its stored dtype, backed by mmap (no copy).

    Pages are read from disk only when touched; the mapping is released when
    the last array referring to it goes away.
    """
    if info.nbytes == 0:
        return np.zeros(info.shape, dtype=DTYPES[info.dtype])
    granularity = mmap.ALLOCATIONGRANULARITY
    aligned = info.start - info.start % granularity
    try:
        with open(info.file, "rb") as handle:
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
    whole = view
    while isinstance(whole, np.ndarray) and _mapping(whole) is None:
        whole = whole.base
    if not isinstance(whole, np.ndarray) or not hasattr(mmap, "MADV_DONTNEED") or not view.size:
        return
    offset = view.__array_interface__["data"][0] - whole.__array_interface__["data"][0]
    start = offset - offset % mmap.PAGESIZE
    _mapping(whole).madvise(mmap.MADV_DONTNEED, start, offset + view.nbytes - start)


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    """The mmap an array was made from by ``np.frombuffer`` (directly or via a memoryview)."""
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
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        files = _files_of_directory(path)
    elif path.name.endswith(INDEX_SUFFIX) or path.suffix == ".json":
        files = _files_of_index(path)
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
    return Checkpoint(path=path, files=files, tensors=tensors)


def _refuse_pickle(path: Path) -> None:
    """Refuse pickle checkpoints: unpickling runs arbitrary code."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints are refused (svdrank reads safetensors only and "
            "never unpickles); convert it to .safetensors first"
        )


def _files_of_directory(directory: Path) -> tuple[Path, ...]:
    """The shards of a directory: those its index names, else every .safetensors file."""
    indexes = sorted(directory.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        names = ", ".join(index.name for index in indexes)
        raise CheckpointError(f"{directory}: several index files ({names}); name one of them")
    if indexes:
        return _files_of_index(indexes[0])
    files = tuple(sorted(directory.glob("*.safetensors")))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(directory / pickles[0])
    raise CheckpointError(f"{directory}: no .safetensors files in this directory")


def _files_of_index(index: Path) -> tuple[Path, ...]:
    """The shard files an index's ``weight_map`` names, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{index}: not a safetensors index (expected JSON with a 'weight_map'): {exc}"
        ) from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' is empty or not an object")
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        file = index.parent / str(shard)
        if not file.is_file():
            raise CheckpointError(f"{index}: names shard {shard!r}, which does not exist")
        files.append(file)
    return tuple(files)


def read_header(file: Path) -> list[TensorInfo]:
    """Parse and validate one safetensors header without reading tensor data.

    Raises
    ------
    CheckpointError
        If the file is empty, truncated, not safetensors, or its header is
        inconsistent (offsets outside the file, sizes that do not match shapes).
    """
    size = file.stat().st_size
    if size == 0:
        raise CheckpointError(f"{file}: empty file")
    if size < HEADER_SIZE_BYTES:
        raise CheckpointError(f"{file}: truncated ({size} bytes, shorter than a header)")
    with open(file, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(HEADER_SIZE_BYTES))
        if header_len > MAX_HEADER_BYTES or header_len > size - HEADER_SIZE_BYTES:
            raise CheckpointError(
                f"{file}: not a safetensors file or truncated (header length {header_len} "
                f"exceeds the file size {size})"
            )
        header_bytes = handle.read(header_len)
    header = _decode_header(file, header_bytes)
    data_start = HEADER_SIZE_BYTES + header_len
    infos = [
        _tensor_info(file, name, entry, data_start)
        for name, entry in header.items()
        if name != "__metadata__"
    ]
    _check_extent(file, infos, size)
    return infos


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
    with open(file, "rb") as handle:
        prefix = handle.read(HEADER_SIZE_BYTES)
        (header_len,) = struct.unpack("<Q", prefix)
        return hashlib.sha256(prefix + handle.read(header_len)).hexdigest()


def _decode_header(file: Path, header_bytes: bytes) -> dict:
    """The header's JSON object, or a one-line error."""
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{file}: not a safetensors file (invalid header JSON: {exc})"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")
    return header


def _tensor_info(file: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    """Validate one header entry and turn it into a TensorInfo."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(int(dim) for dim in shape)
        begin, end = int(begin), int(end)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: malformed header entry for tensor {name!r}") from exc
    if dtype not in DTYPES:
        known = ", ".join(DTYPES)
        raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype} ({known})")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if any(dim < 0 for dim in shape) or end - begin != expected or begin < 0:
        raise CheckpointError(
            f"{file}: tensor {name!r} has data_offsets [{begin}, {end}] that do not fit its "
            f"shape {list(shape)} and dtype {dtype}"
        )
    return TensorInfo(name, shape, dtype, expected, file, data_start + begin)


def _check_extent(file: Path, infos: list[TensorInfo], size: int) -> None:
    """Every tensor's bytes must lie inside the file (a truncated file fails here)."""
    end = max((info.start + info.nbytes for info in infos), default=0)
    if end > size:
        raise CheckpointError(
            f"{file}: truncated (tensor data needs {end} bytes, the file has {size})"
        )
