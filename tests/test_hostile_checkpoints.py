"""Hostile checkpoints: whatever a user, a script or a broken disk hands us is one line, exit 2.

Every bad input is driven through the real commands (``svdrank inspect X`` and
``svdrank diff BASE TUNED -o OUT``), in a subprocess with a timeout wherever a
hang must be ruled out, and the folder holding it is compared before and after:
nothing new, nothing changed, the analysis not written. The reference for what
is valid is the ``safetensors`` library itself (its Rust core), via ``safe_open``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from svdrank.errors import CheckpointError
from svdrank.inputs.checkpoint import DTYPES, open_checkpoint, read_tensor_view
from tests.conftest import REPO, assert_one_line_error, write_checkpoint

INDEX = "model.safetensors.index.json"
SHARD = "model-1.safetensors"
MAX_HEADER = 100 * 1024 * 1024
DEEP = 200_000

W = np.arange(4, dtype=np.float32).reshape(2, 2)
B = np.arange(4, 8, dtype=np.float32)
VALID = {
    "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
}
DATA = W.tobytes() + B.tobytes()


def _file_bytes(header: dict | bytes, data: bytes = DATA, declared: int | None = None) -> bytes:
    """A safetensors file built by hand: 8-byte length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def _with(name: str, **fields: object) -> dict:
    """The valid header with some fields of one tensor replaced."""
    return {**VALID, name: {**VALID[name], **fields}}


def _raw(entry_w: str) -> bytes:
    """The valid header as raw JSON text, with tensor 'w' written as given."""
    entry_b = json.dumps(VALID["b"])
    return f'{{"w": {entry_w}, "b": {entry_b}}}'.encode()


W_TEXT = '{"dtype": "F32", "shape": %s, "data_offsets": [0, 16]}'
NESTED = "[" * DEEP + "]" * DEEP

# case -> (file bytes, fragments the one error line must contain besides the file)
BAD_HEADERS = {
    "dtype a list": (_file_bytes(_with("w", dtype=["F32"])), ["tensor 'w'", "unsupported dtype"]),
    "dtype with a newline": (
        _file_bytes(_with("w", dtype="F32\nsecond line")),
        ["tensor 'w'", "'F32\\nsecond line'"],
    ),
    "shape Infinity": (_file_bytes(_raw(W_TEXT % "[Infinity, 2]")), ["Infinity", "not a JSON"]),
    "shape NaN": (_file_bytes(_raw(W_TEXT % "[NaN, 2]")), ["NaN", "not a JSON number"]),
    "shape 1e400": (_file_bytes(_raw(W_TEXT % "[1e400, 2]")), ["tensor 'w'", "shape [inf, 2]"]),
    "shape -1": (_file_bytes(_with("w", shape=[-1, 2])), ["tensor 'w'", "shape [-1, 2]"]),
    "shape 2.0": (_file_bytes(_raw(W_TEXT % "[2.0, 2]")), ["tensor 'w'", "shape [2.0, 2]"]),
    "shape true": (_file_bytes(_raw(W_TEXT % "[true, 2]")), ["tensor 'w'", "not a list of"]),
    "shape a string": (_file_bytes(_with("w", shape="2,2")), ["tensor 'w'", "shape '2,2'"]),
    "shape of 5000 digits": (
        _file_bytes(_raw(W_TEXT % f"[1{'0' * 5000}, 2]")),
        ["number too long"],
    ),
    "shape beyond 64 bits": (
        _file_bytes(_with("w", shape=[2**64, 2])),
        ["tensor 'w'", "64-bit integers"],
    ),
    "size beyond 64 bits": (
        _file_bytes(_with("w", shape=[2**32, 2**32], data_offsets=[0, 16])),
        ["tensor 'w'", "too large for 64-bit sizes"],
    ),
    "duplicate tensor name": (
        _file_bytes(
            _raw(W_TEXT % "[2, 2]")[:-1] + b', "w": ' + (W_TEXT % "[2, 2]").encode() + b"}"
        ),
        ["names 'w' twice"],
    ),
    "overlapping offsets": (
        _file_bytes(_with("b", data_offsets=[8, 24]), DATA[:24]),
        ["tensor 'b'", "overlaps"],
    ),
    "gap between offsets": (
        _file_bytes(_with("b", data_offsets=[20, 36]), DATA + b"\0" * 4),
        ["tensor 'b'", "leaves a gap"],
    ),
    "offsets begin > end": (
        _file_bytes(_with("b", data_offsets=[32, 16])),
        ["tensor 'b'", "data_offsets [32, 16] do not fit"],
    ),
    "offsets not two": (
        _file_bytes(_with("b", data_offsets=[16])),
        ["tensor 'b'", "are not two"],
    ),
    "trailing bytes": (_file_bytes(VALID, DATA + b"extra"), ["5 bytes after the last tensor"]),
    "truncated data": (_file_bytes(VALID, DATA[:-4]), ["truncated"]),
    "header over 100 MB": (
        _file_bytes(b"{}", b"", declared=MAX_HEADER + 1),
        ["over the format's limit"],
    ),
    "padding before '{'": (_file_bytes(b"  " + json.dumps(VALID).encode()), ["start with '{'"]),
    "nested deep in __metadata__": (
        _file_bytes(f'{{"__metadata__": {{"a": {NESTED}}}}}'.encode(), b""),
        ["nested too deeply"],
    ),
    "nested deep in a tensor": (
        _file_bytes(_raw(W_TEXT % NESTED)),
        ["nested too deeply"],
    ),
    "__metadata__ value not a string": (
        _file_bytes({"__metadata__": {"format": 1}, **VALID}),
        ["__metadata__ must map strings to strings"],
    ),
    "__metadata__ a list": (
        _file_bytes({"__metadata__": ["pt"], **VALID}),
        ["__metadata__ must map strings to strings"],
    ),
    "header not UTF-8": (
        _file_bytes(json.dumps(VALID).encode().replace(b'"w"', b'"w\xff"')),
        ["not UTF-8"],
    ),
    "lone surrogate in a name": (
        _file_bytes(json.dumps(VALID).replace('"w"', '"w\\ud800"').encode()),
        ["'w\\ud800'", "not Unicode"],
    ),
    "missing data_offsets": (
        _file_bytes({**VALID, "w": {"dtype": "F32", "shape": [2, 2]}}),
        ["tensor 'w'", "needs dtype, shape and data_offsets"],
    ),
}


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Kind, size, mtime and (readable regular files) digest of every entry; FIFOs never opened."""
    entries = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            info = path.lstat()
            readable = stat.S_ISREG(info.st_mode) and os.access(path, os.R_OK)
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if readable else None
            entries[str(path.relative_to(folder))] = (
                stat.S_IFMT(info.st_mode),
                info.st_size,
                info.st_mtime_ns,
                digest,
            )
    return entries


@pytest.fixture
def base(tmp_path):
    """A valid BASE for diff, written by safetensors' own writer."""
    return write_checkpoint(tmp_path / "base.safetensors", {"w": W, "b": B})


@pytest.fixture
def refused(tmp_path, run_cli, base):
    """Run inspect and diff on a bad input; each is one line naming it, and nothing is written."""

    def check(bad: Path, *fragments: str) -> None:
        output = tmp_path / "analysis.json"
        before = _snapshot(tmp_path)
        assert_one_line_error(run_cli("inspect", bad), str(bad), *fragments)
        assert_one_line_error(run_cli("diff", base, bad, "-o", output), str(bad), *fragments)
        assert not output.exists()
        assert _snapshot(tmp_path) == before

    return check


def _cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """Run the real ``svdrank`` in its own process; a hang fails the test after 20 s."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "svdrank", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=cwd,
        env=env,
    )


# --- 1. Header content -------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_header_is_one_line_error_naming_file_and_tensor(tmp_path, refused, case):
    content, fragments = BAD_HEADERS[case]
    bad = tmp_path / "tuned.safetensors"
    bad.write_bytes(content)

    refused(bad, *fragments)


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        ({"w" * 10**5: {**VALID["w"], "dtype": "?"}}, "tensor 'wwww"),
        (_with("w", dtype="x" * 10**5), "unsupported dtype 'xxxx"),
        (_with("w", shape=[*range(10**5), -1]), "shape [0, 1, 2, 3, 4, 5, ...]"),
    ],
    ids=["name", "dtype", "shape"],
)
def test_error_line_stays_short_whatever_the_header_holds(tmp_path, run_cli, header, fragment):
    bad = tmp_path / "tuned.safetensors"
    bad.write_bytes(_file_bytes(header))

    result = run_cli("inspect", bad)

    assert_one_line_error(result, str(bad), fragment)
    assert len(result.stderr) < 1000


def test_entries_out_of_offset_order_that_tile_the_buffer_are_valid(tmp_path, run_cli):
    # The reference sorts entries by offset before checking they tile the buffer.
    path = tmp_path / "shuffled.safetensors"
    path.write_bytes(_file_bytes({"b": VALID["b"], "w": VALID["w"]}))

    result = run_cli("inspect", path, "--format", "json")

    assert result.exit_code == 0, result.stderr
    listed = {t["name"]: (t["shape"], t["dtype"]) for t in json.loads(result.stdout)["tensors"]}
    assert listed == {"w": ([2, 2], "F32"), "b": ([4], "F32")}
    checkpoint = open_checkpoint(path)
    with safe_open(str(path), framework="numpy") as reference:
        for name, expected in {"w": W, "b": B}.items():
            np.testing.assert_array_equal(checkpoint.read(name), expected)
            np.testing.assert_array_equal(reference.get_tensor(name), expected)


def test_null_metadata_is_valid_as_in_the_reference(tmp_path, run_cli):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_file_bytes({"__metadata__": None, **VALID}))
    with safe_open(str(path), framework="numpy") as reference:
        assert reference.metadata() is None

    result = run_cli("inspect", path, "--format", "json")

    assert result.exit_code == 0, result.stderr
    np.testing.assert_array_equal(open_checkpoint(path).read("w"), W)


# --- 2. Index files ----------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path):
    """A shard directory (one valid shard) whose index the test writes."""
    folder = tmp_path / "tuned"
    folder.mkdir()
    write_checkpoint(folder / SHARD, {"w": W, "b": B})
    write_checkpoint(folder / "model-2.safetensors", {"c": B})
    return folder


BAD_INDEXES = {
    "weight_map a list": ({"weight_map": [SHARD]}, ["'weight_map' is missing, empty"]),
    "weight_map empty": ({"weight_map": {}}, ["'weight_map' is missing, empty"]),
    "weight_map missing": ({"metadata": {}}, ["'weight_map' is missing, empty"]),
    "tensor absent from its shard": (
        {"weight_map": {"w": SHARD, "ghost": SHARD}},
        ["'ghost'", "in no shard"],
    ),
    "tensor in another shard": (
        {"weight_map": {"w": "model-2.safetensors", "b": SHARD, "c": "model-2.safetensors"}},
        ["'w'", f"it is in {SHARD}"],
    ),
    "shard outside the folder": (
        {"weight_map": {"w": "../x.safetensors"}},
        ["'../x.safetensors'", "a file name beside the index"],
    ),
    "shard in a subfolder": (
        {"weight_map": {"w": "sub/x.safetensors"}},
        ["'sub/x.safetensors'", "a file name beside the index"],
    ),
    "shard not a string": ({"weight_map": {"w": 1}}, ["'w'", "the shard 1"]),
    "index a list": ([{"weight_map": {"w": SHARD}}], ["the JSON is not an object"]),
    "index nested deep": (
        f'{{"weight_map": {NESTED}}}',
        ["nested too deeply"],
    ),
}


@pytest.mark.parametrize("via", ["folder", "index"])
@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_bad_index_is_one_line_error(tmp_path, sharded, refused, case, via):
    content, fragments = BAD_INDEXES[case]
    index = sharded / INDEX
    index.write_text(content if isinstance(content, str) else json.dumps(content))
    # A valid file where '../x.safetensors' points: it must not be read either.
    write_checkpoint(tmp_path / "x.safetensors", {"w": W})

    refused(sharded if via == "folder" else index, str(index), *fragments)


# --- 3. The file system ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "diff"])
def test_fifo_as_input_is_refused_without_hanging(tmp_path, base, command):
    fifo = tmp_path / "tuned.safetensors"
    os.mkfifo(fifo)
    output = tmp_path / "analysis.json"
    args = ["inspect", fifo] if command == "inspect" else ["diff", base, fifo, "-o", output]
    before = _snapshot(tmp_path)

    done = _cli(*args, cwd=tmp_path)

    assert_one_line_error(done, str(fifo), "FIFO")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("fifo_name", "index", "fragments"),
    [
        (INDEX, None, [INDEX, "is a FIFO (named pipe), not an index file"]),
        ("model-2.safetensors", {"w": SHARD, "c": "model-2.safetensors"}, ["which is a FIFO"]),
    ],
)
def test_fifo_index_or_shard_in_a_folder_is_refused_without_hanging(
    tmp_path, fifo_name, index, fragments
):
    folder = tmp_path / "tuned"
    folder.mkdir()
    write_checkpoint(folder / SHARD, {"w": W, "b": B})
    if index is not None:
        (folder / INDEX).write_text(json.dumps({"weight_map": index}))
    os.mkfifo(folder / fifo_name)
    before = _snapshot(tmp_path)

    done = _cli("inspect", folder, cwd=tmp_path)

    assert_one_line_error(done, str(folder), *fragments)
    assert _snapshot(tmp_path) == before


def test_fifo_named_like_a_shard_beside_a_valid_shard_is_ignored(tmp_path):
    folder = tmp_path / "tuned"
    folder.mkdir()
    write_checkpoint(folder / SHARD, {"w": W, "b": B})
    os.mkfifo(folder / "x.safetensors")

    done = _cli("inspect", folder, "--format", "json", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert sorted(t["name"] for t in record["tensors"]) == ["b", "w"]
    assert [Path(f).name for f in record["files"]] == [SHARD]


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda p: p.symlink_to(p.parent / "nowhere.safetensors"), ["target does not exist"]),
        (lambda p: p.symlink_to(p.name), ["a symlink loop"]),
        (lambda p: p.symlink_to("/dev/zero"), ["a character device"]),
        (lambda p: p.mkdir(), ["no .safetensors files in this directory"]),
    ],
    ids=["dangling symlink", "self-referential symlink", "device", "folder x.safetensors"],
)
def test_path_that_is_not_a_regular_file_is_one_line_error(tmp_path, refused, make, fragments):
    bad = tmp_path / "x.safetensors"
    make(bad)

    refused(bad, *fragments)


def test_looping_and_dangling_symlinks_beside_a_valid_shard_are_ignored(tmp_path, run_cli):
    write_checkpoint(tmp_path / SHARD, {"w": W})
    (tmp_path / "loop.safetensors").symlink_to("loop.safetensors")
    (tmp_path / "gone.safetensors").symlink_to("nowhere")

    result = run_cli("inspect", tmp_path, "--format", "json")

    assert result.exit_code == 0, result.stderr
    assert [t["name"] for t in json.loads(result.stdout)["tensors"]] == ["w"]


def _deny(monkeypatch, function: str, target: Path) -> None:
    """Make ``os.<function>`` fail with EACCES for one path, as a chmod 000 does for non-root."""
    real = getattr(os, function)

    def denied(path, *args, **kwargs):
        if os.fspath(path) == str(target):
            raise PermissionError(13, "Permission denied", str(target))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, function, denied)


@pytest.mark.parametrize("via", ["file", "folder"])
def test_unreadable_shard_is_one_line_error(tmp_path, refused, monkeypatch, via):
    folder = tmp_path / "tuned"
    folder.mkdir()
    shard = write_checkpoint(folder / SHARD, {"w": W, "b": B})
    _deny(monkeypatch, "open", shard)

    refused(shard if via == "file" else folder, str(shard), "Permission denied")


def test_unreadable_folder_is_one_line_error(tmp_path, refused, monkeypatch):
    folder = tmp_path / "tuned"
    folder.mkdir()
    write_checkpoint(folder / SHARD, {"w": W, "b": B})
    _deny(monkeypatch, "listdir", folder)
    _deny(monkeypatch, "scandir", folder)

    refused(folder, "cannot be listed", "Permission denied")


needs_non_root = pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads files whatever their permissions"
)


@needs_non_root
def test_chmod_000_shard_is_one_line_error(tmp_path, refused):
    shard = write_checkpoint(tmp_path / "tuned.safetensors", {"w": W, "b": B})
    shard.chmod(0)
    try:
        refused(shard, "Permission denied")
    finally:
        shard.chmod(0o644)


@needs_non_root
def test_chmod_000_folder_is_one_line_error(tmp_path, refused):
    folder = tmp_path / "tuned"
    folder.mkdir()
    write_checkpoint(folder / SHARD, {"w": W, "b": B})
    folder.chmod(0)
    try:
        refused(folder, "Permission denied")
    finally:
        folder.chmod(0o755)


def test_file_name_with_a_newline_is_still_one_line(tmp_path, run_cli):
    bad = tmp_path / "bad\nname.safetensors"
    bad.write_bytes(b"x")

    assert_one_line_error(run_cli("inspect", bad), "truncated")


# --- 4. Properties: whatever the bytes, CheckpointError or a reading the reference agrees with


FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
NUMPY_DTYPES = {name for name in DTYPES if not name.startswith(("BF", "F8"))}
# Strings the reference might know as a dtype (F4, C64, …) while svdrank does not: never drawn.
DTYPE_LIKE = re.compile(r"[A-Z][A-Z0-9_]*")

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(2**64 - 2, 2**64 + 2),
    st.just(10**400),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8).filter(lambda text: not DTYPE_LIKE.fullmatch(text)),
    st.sampled_from(sorted(DTYPES)),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
tensor_names = st.text(max_size=8).filter(lambda name: name != "__metadata__")


@st.composite
def valid_headers(draw) -> tuple[dict, int]:
    """A header whose tensors tile a buffer, listed in any order; and the buffer's size."""
    names = draw(st.lists(tensor_names, max_size=4, unique=True))
    entries, position = [], 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * DTYPES[dtype].itemsize
        offsets = [position, position + size]
        entries.append((name, {"dtype": dtype, "shape": shape, "data_offsets": offsets}))
        position += size
    header = dict(draw(st.permutations(entries)))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
    return header, position


def _reference_accepts(path: Path) -> bool:
    """Whether safetensors' own reader opens the file."""
    try:
        with safe_open(str(path), framework="numpy"):
            return True
    except Exception:  # the binding raises SafetensorError, OSError or others, by version
        return False


@FUZZ
@given(valid_headers())
def test_valid_header_reads_as_generated_and_as_the_reference_reads_it(tmp_path, generated):
    header, size = generated
    path = tmp_path / "fuzz.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(_file_bytes(raw, np.random.default_rng(0).bytes(size)))

    checkpoint = open_checkpoint(path)

    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    assert list(checkpoint.tensors) == list(tensors)
    for name, entry in tensors.items():
        info = checkpoint.tensors[name]
        begin, end = entry["data_offsets"]
        assert (info.dtype, info.shape) == (entry["dtype"], tuple(entry["shape"]))
        assert (info.start, info.nbytes) == (8 + len(raw) + begin, end - begin)
    with safe_open(str(path), framework="numpy") as reference:
        assert sorted(reference.keys()) == sorted(tensors)
        for name, entry in tensors.items():
            if entry["dtype"] in NUMPY_DTYPES:
                ours = read_tensor_view(checkpoint.tensors[name]).tobytes()
                assert ours == reference.get_tensor(name).tobytes()


@st.composite
def mutated_headers(draw) -> tuple[dict, int]:
    """A valid header with one field, one element of a field, or one entry replaced."""
    header, size = draw(valid_headers().filter(lambda generated: generated[0]))
    name = draw(st.sampled_from(sorted(header)))
    value = draw(json_values)
    entry = header[name]
    if name == "__metadata__":
        keys = sorted(entry)
        if keys and draw(st.booleans()):
            entry[draw(st.sampled_from(keys))] = value
        else:
            header[name] = value
        return header, size
    field = draw(st.sampled_from(["entry", "dtype", "shape", "data_offsets"]))
    if field == "entry":
        header[name] = value
    elif field != "dtype" and entry[field] and draw(st.booleans()):
        entry[field][draw(st.integers(0, len(entry[field]) - 1))] = value
    else:
        entry[field] = value
    return header, size


@FUZZ
@given(mutated_headers())
def test_mutated_header_is_read_or_refused_as_the_reference_does(tmp_path, mutated):
    header, size = mutated
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_file_bytes(header, b"\0" * size))

    try:
        open_checkpoint(path)
        accepted = True
    except CheckpointError:
        accepted = False

    assert accepted == _reference_accepts(path)


file_contents = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda body: struct.pack("<Q", len(body)) + body),
    st.tuples(st.binary(max_size=200), st.integers(0, 40)).map(
        lambda parts: struct.pack("<Q", len(parts[0]) + 1) + b"{" + parts[0] + b"\0" * parts[1]
    ),
)


@FUZZ
@given(file_contents)
def test_random_bytes_are_refused_with_checkpoint_error(tmp_path, content):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(content)

    try:
        open_checkpoint(path)
    except CheckpointError:
        return
    assert _reference_accepts(path)


shard_names = st.sampled_from(
    [
        SHARD,
        "model-2.safetensors",
        "missing.safetensors",
        "../x.safetensors",
        "a/b",
        "",
        ".",
        "..",
        "nul\0.safetensors",
        "/etc/passwd",
    ]
)
weight_maps = st.dictionaries(
    st.sampled_from(["w", "b", "c", "ghost"]) | st.text(max_size=4), shard_names | json_values
)
index_records = st.dictionaries(
    st.sampled_from(["weight_map", "metadata"]) | st.text(max_size=4),
    weight_maps | json_values,
)


@FUZZ
@given(index_records)
def test_random_index_is_read_consistently_or_refused_with_checkpoint_error(sharded, record):
    index = sharded / INDEX
    index.write_text(json.dumps(record))

    try:
        checkpoint = open_checkpoint(index)
    except CheckpointError:
        return
    for name, shard in record["weight_map"].items():
        assert checkpoint.tensors[name].file == sharded / shard
