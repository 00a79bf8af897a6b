"""`diff --cluster`: the layers computed on a Dask cluster give the analysis of a local run.

One LocalCluster of two worker processes (one thread each) serves the module;
the command line connects to it by its address as it would to a real cluster.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import distributed
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from svdrank.analysis import cluster as cluster_module
from svdrank.analysis import pipeline
from svdrank.analysis.delta import form_delta
from svdrank.analysis.resume import ResultsLog
from svdrank.errors import CheckpointError
from svdrank.inputs.checkpoint import header_sha256
from svdrank.spectra.devices import HOST
from tests.conftest import (
    DECAYS,
    SAMPLES,
    assert_one_line_error,
    write_checkpoint,
    write_decaying_pair,
)

LLAMA = {"hidden": 64, "mlp": 96, "kv": 32, "vocab": 80, "blocks": 2}


def write_llama_pair(directory):
    """A BF16 pair with Llama's names and grouped-query shapes, embeddings and lm_head."""
    hidden, mlp, kv = LLAMA["hidden"], LLAMA["mlp"], LLAMA["kv"]
    shapes = {"model.embed_tokens.weight": (LLAMA["vocab"], hidden)}
    for block in range(LLAMA["blocks"]):
        attn, ffn = f"model.layers.{block}.self_attn", f"model.layers.{block}.mlp"
        shapes |= {
            f"{attn}.q_proj.weight": (hidden, hidden),
            f"{attn}.k_proj.weight": (kv, hidden),
            f"{attn}.v_proj.weight": (kv, hidden),
            f"{attn}.o_proj.weight": (hidden, hidden),
            f"{ffn}.gate_proj.weight": (mlp, hidden),
            f"{ffn}.up_proj.weight": (mlp, hidden),
            f"{ffn}.down_proj.weight": (hidden, mlp),
            f"model.layers.{block}.input_layernorm.weight": (hidden,),
        }
    shapes["lm_head.weight"] = (LLAMA["vocab"], hidden)
    rng = np.random.default_rng(11)
    base = {
        name: rng.standard_normal(shape, dtype=np.float32) * 0.02 for name, shape in shapes.items()
    }
    tuned = {
        name: value + rng.standard_normal(value.shape, dtype=np.float32) * 0.002
        for name, value in base.items()
    }
    return tuple(
        write_checkpoint(
            directory / f"{side}.safetensors",
            {name: value.astype(ml_dtypes.bfloat16) for name, value in tensors.items()},
        )
        for side, tensors in (("base", base), ("tuned", tuned))
    )


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    return write_llama_pair(tmp_path_factory.mktemp("llama"))


@pytest.fixture
def decaying_pair(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    return write_decaying_pair(folder, blocks=4)


def _record(path):
    """The analysis file without its timings (per-layer seconds, creation time)."""
    record = json.loads(path.read_text())
    del record["created"]
    for layer in record["layers"]:
        del layer["seconds"]
    return record


def _diff(run_cli, pair, out, *options):
    result = run_cli("diff", *pair, "-o", out, "--format", "json", "--quiet", *options)
    assert result.exit_code == 0, result.stderr
    return _record(out)


def _svdrank_keys(client):
    """The svdrank tasks the scheduler still holds (none once a run has ended)."""
    return client.run_on_scheduler(
        lambda dask_scheduler: [key for key in dask_scheduler.tasks if "svdrank" in str(key)]
    )


def _no_svdrank_tasks_left(client):
    for _ in range(100):
        if not _svdrank_keys(client):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("pair", ["sample", "llama"])
def test_a_cluster_gives_the_analysis_of_a_local_run(
    request, tmp_path, run_cli, dask_cluster, pair
):
    pair = (
        (SAMPLES / "base.safetensors", SAMPLES / "tuned-sharded")
        if pair == "sample"
        else request.getfixturevalue("llama_pair")
    )
    local = _diff(run_cli, pair, tmp_path / "local.json")

    on_cluster = _diff(
        run_cli, pair, tmp_path / "cluster.json", "--cluster", dask_cluster.scheduler.address
    )

    assert on_cluster == local
    assert len(local["layers"]) > 10
    assert not (tmp_path / "cluster.json.resume").exists()
    assert _no_svdrank_tasks_left(dask_cluster)


def _held_layers(client):
    """Each worker's svdrank tasks: results held in its memory, or being computed there."""
    held: dict[str, set] = {}
    for mapping in (client.has_what(), client.processing()):
        for worker, keys in mapping.items():
            held.setdefault(worker, set()).update(key for key in keys if "svdrank" in str(key))
    return held


def test_a_lost_workers_layers_are_computed_again(tmp_path, decaying_pair, dask_cluster):
    local = pipeline.analyze(*decaying_pair)
    killed = []

    def kill_a_busy_worker(update):
        if killed:
            return
        held = _held_layers(dask_cluster)
        worker = max(held, key=lambda address: len(held[address]))
        killed.append((worker, len(held[worker])))
        os.kill(dask_cluster.run(os.getpid, workers=[worker])[worker], signal.SIGKILL)

    on_cluster = pipeline.analyze(
        *decaying_pair, cluster=dask_cluster.scheduler.address, progress=kill_a_busy_worker
    )

    assert killed[0][1] > 0, "the killed worker held none of the run's layers"
    dask_cluster.wait_for_workers(2, timeout=60)
    assert killed[0][0] not in dask_cluster.scheduler_info()["workers"]
    for first, second in zip(local.layers, on_cluster.layers, strict=True):
        assert first.module == second.module
        assert np.array_equal(first.spectrum.values, second.spectrum.values)
        assert (first.spectrum.engine, first.spectrum.complete) == (
            second.spectrum.engine,
            second.spectrum.complete,
        )
        assert first.delta_norm == second.delta_norm
        assert first.noise == second.noise


def test_a_bad_layer_exits_2_writes_nothing_and_cancels_the_rest(tmp_path, run_cli, dask_cluster):
    base, tuned = write_llama_pair(tmp_path)
    tensors = load_file(tuned)
    broken = "model.layers.1.mlp.up_proj.weight"
    tensors[broken] = tensors[broken].copy()
    tensors[broken][3, 5] = np.nan
    write_checkpoint(tuned, tensors)
    out = tmp_path / "a.json"

    result = run_cli("diff", base, tuned, "-o", out, "--cluster", dask_cluster.scheduler.address)

    assert_one_line_error(result, broken, "NaN")
    assert not out.exists()
    assert not (tmp_path / "a.json.resume").exists()
    assert _no_svdrank_tasks_left(dask_cluster)


def test_a_run_on_a_cluster_resumes_computing_only_the_rest(
    tmp_path, decaying_pair, run_cli, dask_cluster, monkeypatch
):
    address = dask_cluster.scheduler.address
    whole = _diff(run_cli, decaying_pair, tmp_path / "whole.json")
    out = tmp_path / "a.json"
    real_append = ResultsLog.append

    def append_then_interrupt(log, index, result):
        real_append(log, index, result)
        if len(log.path.read_text().splitlines()) > 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResultsLog, "append", append_then_interrupt)
    result = run_cli("diff", *decaying_pair, "-o", out, "--cluster", address)
    monkeypatch.undo()

    assert result.exit_code == 130, result.stderr
    assert "--resume" in result.stderr
    assert not out.exists()
    assert _no_svdrank_tasks_left(dask_cluster)
    submitted = []
    real_submit = distributed.Client.submit

    def counting_submit(client, function, *args, **kwargs):
        submitted.append(kwargs.get("key"))
        return real_submit(client, function, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "submit", counting_submit)

    resumed = _diff(run_cli, decaying_pair, out, "--cluster", address, "--resume")

    assert len(submitted) == 4 * len(DECAYS) - 3
    assert resumed == whole
    assert not (tmp_path / "a.json.resume").exists()


def _other_digest(file):
    return "0" * 64


def _unreadable(file):
    raise CheckpointError(f"{file}: no such file")


@pytest.mark.parametrize(
    ("seen", "words"),
    [(_other_digest, "sees another file at"), (_unreadable, "cannot read")],
    ids=["other-file", "missing"],
)
def test_workers_that_see_other_files_are_refused_with_one_line(
    tmp_path, decaying_pair, run_cli, dask_cluster, seen, words
):
    worker = sorted(dask_cluster.scheduler_info()["workers"])[0]
    dask_cluster.run(setattr, cluster_module, "header_sha256", seen, workers=[worker])
    out = tmp_path / "a.json"
    try:
        result = run_cli(
            "diff", *decaying_pair, "-o", out, "--cluster", dask_cluster.scheduler.address
        )
    finally:
        dask_cluster.run(
            setattr, cluster_module, "header_sha256", header_sha256, workers=[worker]
        )

    assert_one_line_error(result, worker, words, str(decaying_pair[0].absolute()))
    assert list(tmp_path.glob("a.json*")) == []


def test_without_dask_the_cluster_option_says_how_to_install_it(
    tmp_path, decaying_pair, run_cli, monkeypatch
):
    monkeypatch.setitem(sys.modules, "distributed", None)

    result = run_cli("diff", *decaying_pair, "-o", tmp_path / "a.json", "--cluster", "local:2")

    assert_one_line_error(result, "--cluster", "pip install 'svdrank[cluster]'")
    assert list(tmp_path.glob("a.json*")) == []


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (("--cluster", "local:0"), ("local:N", "N ≥ 1")),
        (("--cluster", "local:two"), ("local:N",)),
        (("--cluster", "local:2", "--workers", "2"), ("--workers", "--cluster")),
        (("--cluster", "tcp://127.0.0.1:1"), ("tcp://127.0.0.1:1", "no Dask scheduler")),
        (("--cluster", "foo"), ("--cluster foo", "missing port number")),
    ],
)
def test_cluster_options_that_cannot_work_are_one_line(
    tmp_path, decaying_pair, run_cli, monkeypatch, options, words
):
    monkeypatch.setattr(cluster_module, "CONNECT_SECONDS", 1)
    result = run_cli("diff", *decaying_pair, "-o", tmp_path / "a.json", *options)

    assert_one_line_error(result, *words)
    assert list(tmp_path.glob("a.json*")) == []


DOOMED = "model.layers.2.self_attn.k_proj"


def _die_on_one_layer(layer, noise, kernels=HOST):
    """Form ΔW, except for DOOMED: its worker process dies there (as one out of memory does)."""
    if layer.module == DOOMED:
        os._exit(1)
    return form_delta(layer, noise, kernels)


def _allow_failures(count, dask_scheduler=None):
    dask_scheduler.allowed_failures = count


def test_a_layer_that_keeps_killing_its_workers_is_one_line_and_keeps_the_log(
    tmp_path, decaying_pair, run_cli, dask_cluster, monkeypatch
):
    dask_cluster.run_on_scheduler(_allow_failures, 0)
    monkeypatch.setattr(pipeline, "form_delta", _die_on_one_layer)
    out = tmp_path / "a.json"
    try:
        result = run_cli(
            "diff", *decaying_pair, "-o", out, "--cluster", dask_cluster.scheduler.address
        )
    finally:
        dask_cluster.run_on_scheduler(_allow_failures, 3)
        dask_cluster.wait_for_workers(2, timeout=60)

    assert_one_line_error(result, "died repeatedly", "out of memory", "Running on a cluster")
    assert not out.exists()
    assert (tmp_path / "a.json.resume").exists()
    assert _no_svdrank_tasks_left(dask_cluster)


def test_an_adapter_refuses_the_cluster_option_with_one_line(run_cli):
    result = run_cli("diff", SAMPLES / "adapter", "--cluster", "local:2")

    assert_one_line_error(result, "--cluster", "adapter")
