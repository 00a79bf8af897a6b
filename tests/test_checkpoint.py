"""Reading safetensors checkpoints: dtypes, shards, laziness and bad input."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from svdrank.inputs.checkpoint import forget_pages, open_checkpoint, read_tensor_view
from tests.conftest import SAMPLES, assert_one_line_error, write_checkpoint

FLOAT_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


@pytest.mark.parametrize("dtype", sorted(FLOAT_DTYPES))
def test_each_float_dtype_decodes_bit_exactly_like_torch(tmp_path, dtype):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((37, 19)) * 3).astype(FLOAT_DTYPES[dtype])
    path = write_checkpoint(tmp_path / "m.safetensors", {"w": values})

    checkpoint = open_checkpoint(path)
    decoded = checkpoint.read("w")

    reference = load_file(path)["w"].to(torch.float64).numpy()
    assert checkpoint.tensors["w"].dtype == dtype
    assert decoded.dtype == (np.float64 if dtype == "F64" else np.float32)
    np.testing.assert_array_equal(decoded.astype(np.float64), reference)


@pytest.mark.parametrize(
    ("dtype", "numpy_dtype"),
    [("I64", np.int64), ("I32", np.int32), ("U8", np.uint8), ("BOOL", np.bool_)],
)
def test_integer_and_bool_tensors_are_listed_and_not_floating(tmp_path, dtype, numpy_dtype):
    values = np.arange(12).reshape(3, 4).astype(numpy_dtype)
    path = write_checkpoint(tmp_path / "m.safetensors", {"buf": values})

    checkpoint = open_checkpoint(path)

    info = checkpoint.tensors["buf"]
    assert (info.dtype, info.shape, info.floating) == (dtype, (3, 4), False)
    np.testing.assert_array_equal(checkpoint.read("buf"), values)


def test_header_listing_gives_shape_dtype_bytes_and_file(tmp_path):
    path = write_checkpoint(
        tmp_path / "m.safetensors",
        {"a": np.zeros((4, 6), np.float16), "b": np.zeros(5, np.float32)},
    )

    tensors = open_checkpoint(path).tensors

    assert {name: (i.shape, i.dtype, i.nbytes, i.file) for name, i in tensors.items()} == {
        "a": ((4, 6), "F16", 48, path),
        "b": ((5,), "F32", 20, path),
    }


def test_sharded_sample_gives_the_same_tensors_as_the_single_file():
    single = open_checkpoint(SAMPLES / "tuned.safetensors")
    by_directory = open_checkpoint(SAMPLES / "tuned-sharded")
    by_index = open_checkpoint(SAMPLES / "tuned-sharded" / "model.safetensors.index.json")

    assert len(by_directory.files) == 2
    for sharded in (by_directory, by_index):
        assert set(sharded.tensors) == set(single.tensors)
        for name, info in single.tensors.items():
            assert (sharded.tensors[name].shape, sharded.tensors[name].dtype) == (
                info.shape,
                info.dtype,
            )
            np.testing.assert_array_equal(sharded.read(name), single.read(name))


def test_directory_without_index_reads_every_shard(tmp_path):
    write_checkpoint(tmp_path / "a.safetensors", {"x": np.ones((2, 2), np.float32)})
    write_checkpoint(tmp_path / "b.safetensors", {"y": np.ones((3, 2), np.float32)})

    assert set(open_checkpoint(tmp_path).tensors) == {"x", "y"}


def test_tensor_in_two_shards_is_refused(tmp_path):
    write_checkpoint(tmp_path / "a.safetensors", {"x": np.ones((2, 2), np.float32)})
    write_checkpoint(tmp_path / "b.safetensors", {"x": np.ones((2, 2), np.float32)})

    with pytest.raises(Exception, match="appears in both"):
        open_checkpoint(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_reading_one_small_tensor_maps_only_its_bytes(tmp_path):
    """Reading a 4 kB tensor of a 64 MB file leaves peak RSS flat; reading the big one does not."""
    big = np.zeros(16_000_000, np.float32)
    big[::1024] = 1.0  # real, non-zero pages throughout the file
    path = write_checkpoint(
        tmp_path / "big.safetensors", {"small": np.ones((32, 32), np.float32), "big": big}
    )
    del big
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child started from
    # this (large) test process would report the parent's peak and see no growth at all.
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from svdrank.inputs.checkpoint import open_checkpoint
        def peak():
            status = Path("/proc/self/status").read_text().splitlines()
            return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
        before = peak()
        checkpoint = open_checkpoint({str(path)!r})
        assert checkpoint.read("small").sum() == 1024
        small = peak()
        assert checkpoint.read("big").sum(dtype="float64") == 15_625
        print(small - before, peak() - small)
        """
    )
    output = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    small_growth, big_growth = map(int, output.split())
    assert path.stat().st_size > 64_000_000
    assert small_growth < 8_000_000
    assert big_growth > 48_000_000  # the measurement does see a read of the big tensor


def _resident_file_bytes() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("RssFile:")).split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_forget_pages_returns_a_consumed_chunk_and_the_data_stays_readable(tmp_path):
    values = np.arange(32_000_000, dtype=np.float32).reshape(8000, 4000)  # 128 MB
    path = write_checkpoint(tmp_path / "big.safetensors", {"w": values})
    view = read_tensor_view(open_checkpoint(path).tensors["w"])

    assert float(view[:4000].sum(dtype=np.float64)) == float(values[:4000].sum(dtype=np.float64))
    touched = _resident_file_bytes()
    forget_pages(view[:4000])
    released = touched - _resident_file_bytes()

    assert released > 60_000_000  # the 64 MB chunk left the resident set
    np.testing.assert_array_equal(view[3999:4001], values[3999:4001])  # read back on demand
    forget_pages(np.ones(3))  # not a mapped view: nothing to do


def _valid_file(tmp_path):
    return write_checkpoint(tmp_path / "ok.safetensors", {"w": np.ones((64, 64), np.float32)})


def _with_header(header: dict | bytes, declared: int | None = None, tail: bytes = b"") -> bytes:
    """A file's bytes: the 8-byte length, the header, then ``tail`` as the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + tail


F32_VECTOR = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}

# case -> (file bytes, words the one-line error must contain)
BAD_FILES = {
    "empty": (b"", "empty file"),
    "shorter than a header": (b"\x01\x02", "truncated"),
    "garbage": (b"hello, I am not a model" * 9, "not a safetensors file"),
    "header beyond size": (_with_header(b"{}", declared=10_000), "exceeds the file size"),
    "invalid JSON": (_with_header(b"{not json"), "invalid header JSON"),
    "JSON not an object": (_with_header(b"[1, 2]"), "does not start with"),
    "offsets beyond the file": (_with_header({"w": F32_VECTOR}), "truncated"),
    "offsets not matching shape": (
        _with_header({"w": {**F32_VECTOR, "data_offsets": [0, 8]}}, tail=b"\0" * 16),
        "do not fit its shape",
    ),
    "unknown dtype": (
        _with_header({"w": {**F32_VECTOR, "dtype": "Q4"}}, tail=b"\0" * 16),
        "unsupported dtype Q4",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_line_error_exit_2(tmp_path, run_cli, case):
    content, words = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)

    result = run_cli("inspect", path)

    assert_one_line_error(result, str(path), words)


def test_truncated_file_is_one_line_error_exit_2(tmp_path, run_cli):
    path = _valid_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])

    assert_one_line_error(run_cli("inspect", path), str(path), "truncated")


def test_missing_path_is_one_line_error_exit_2(tmp_path, run_cli):
    assert_one_line_error(run_cli("inspect", tmp_path / "nope"), "no such file")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path, run_cli, suffix):
    path = tmp_path / f"pytorch_model{suffix}"
    path.write_bytes(b"\x80\x04 this would be a pickle")

    assert_one_line_error(run_cli("inspect", path), str(path), "never unpickles")


def test_directory_of_only_pickles_is_refused(tmp_path, run_cli):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")

    assert_one_line_error(run_cli("inspect", tmp_path), "never unpickles")


def test_index_naming_a_missing_shard_is_one_line_error(tmp_path, run_cli):
    write_checkpoint(tmp_path / "model-1.safetensors", {"x": np.ones((2, 2), np.float32)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        json.dumps({"weight_map": {"x": "model-1.safetensors", "y": "model-2.safetensors"}})
    )

    assert_one_line_error(run_cli("inspect", tmp_path), "model-2.safetensors", "does not exist")


def test_corrupt_index_is_one_line_error(tmp_path, run_cli):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{ nope")

    assert_one_line_error(run_cli("inspect", index), str(index), "not a readable safetensors index")


def test_empty_directory_is_one_line_error(tmp_path, run_cli):
    assert_one_line_error(run_cli("inspect", tmp_path), "no .safetensors files")


@pytest.mark.parametrize(
    "target",
    [
        "base.safetensors",
        "tuned.safetensors",
        "tuned-sharded",
        "tuned-sharded/model.safetensors.index.json",
        "tuned-sharded/model-00001-of-00002.safetensors",
        "adapter",
        "adapter/adapter_model.safetensors",
    ],
)
def test_inspect_reads_every_sample(run_cli, target):
    result = run_cli("inspect", SAMPLES / target, "--format", "json")

    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["schema"] == "svdrank.inspect/1"
    assert record["totals"]["tensors"] == len(record["tensors"]) > 0
    assert record["totals"]["bytes"] == sum(item["bytes"] for item in record["tensors"])


def test_inspect_table_has_totals_per_dtype_and_kind(run_cli):
    result = run_cli("inspect", SAMPLES / "tuned.safetensors", "--format", "table")

    for text in ("Totals per dtype", "Totals per kind", "BF16", "I64", "q_proj", "40 tensors"):
        assert text in result.stdout
