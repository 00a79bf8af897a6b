"""`extract --cluster`: the adapter written from a Dask cluster's workers is a local run's.

One LocalCluster of two worker processes (one thread each) serves the module;
the command line and the library connect to it by its address as they would
to a real cluster. Each route is compared with a local extraction of the same
pair, file for file and module for module.
"""

from __future__ import annotations

import json
import os

import distributed
import numpy as np
import pytest
from safetensors.numpy import load_file

from svdrank.analysis import cluster as cluster_module
from svdrank.analysis import extract_cluster
from svdrank.analysis.delta import form_delta
from svdrank.outputs.extract import extract
from tests.conftest import SAMPLES, assert_one_line_error, write_checkpoint, write_decaying_pair
from tests.test_cluster import _no_svdrank_tasks_left

pytestmark = pytest.mark.filterwarnings("ignore:no config.json beside the checkpoints")

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
ROUTES = {"one-pass": {"preset": "balanced"}, "two-pass": {"budget_ratio": 0.2}}
"""A rule that ranks each layer alone (one pass), and a budget (analysis, then factors)."""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Three blocks of q, k, v: a probe and two hinted layers per kind; Gram and sketch spectra."""
    return write_decaying_pair(tmp_path_factory.mktemp("pair"), blocks=3)


def _options(rule):
    return [f"--{name.replace('_', '-')}={value}" for name, value in ROUTES[rule].items()]


def _extract_cli(run_cli, pair, out, *options):
    result = run_cli("extract", *pair, "-o", out, "--format", "json", "--quiet", *options)
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    del record["directory"]
    return record


def _assert_same_adapter(first, second):
    for name in ADAPTER_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


SUBMITTED = {
    "one-pass": {"layer": 9},
    "two-pass": {"layer": 9, "factors": 9},
}
"""The tasks each route submits: a pass per layer (a probe's hint goes to the other layers of
its group as a plain argument); or an analysis and the factors of every layer (each gets a
rank under this budget)."""


@pytest.mark.parametrize("route", ROUTES)
def test_the_cli_on_a_cluster_writes_the_local_adapter_byte_for_byte(
    tmp_path, run_cli, dask_cluster, pair, route, monkeypatch
):
    local = _extract_cli(run_cli, pair, tmp_path / "local", *_options(route))
    submitted = []
    real_submit = distributed.Client.submit

    def counting_submit(client, function, *args, **kwargs):
        submitted.append(kwargs["key"].split("-")[1])
        return real_submit(client, function, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "submit", counting_submit)

    on_cluster = _extract_cli(
        run_cli,
        pair,
        tmp_path / "cluster",
        *_options(route),
        "--cluster",
        dask_cluster.scheduler.address,
    )

    assert on_cluster == local
    assert len(local["modules"]) == 9
    assert len({module["rank"] for module in local["modules"]}) > 1
    _assert_same_adapter(tmp_path / "local", tmp_path / "cluster")
    assert {kind: submitted.count(kind) for kind in set(submitted)} == SUBMITTED[route]
    assert _no_svdrank_tasks_left(dask_cluster)


@pytest.mark.parametrize("route", ROUTES)
def test_the_library_on_a_cluster_gives_the_local_extraction(tmp_path, dask_cluster, pair, route):
    local = extract(*pair, tmp_path / "local", **ROUTES[route])

    on_cluster = extract(
        *pair, tmp_path / "cluster", cluster=dask_cluster.scheduler.address, **ROUTES[route]
    )

    assert [layer.module for layer in on_cluster.layers] == [layer.module for layer in local.layers]
    assert [
        (layer.rank, layer.error, layer.energy, layer.method) for layer in on_cluster.layers
    ] == [(layer.rank, layer.error, layer.energy, layer.method) for layer in local.layers]
    assert on_cluster.rule == local.rule
    _assert_same_adapter(tmp_path / "local", tmp_path / "cluster")


def test_a_local_cluster_started_for_a_budget_serves_both_passes(tmp_path, pair, monkeypatch):
    started = []
    real = distributed.LocalCluster

    def counting(*args, **kwargs):
        started.append(kwargs["n_workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(distributed, "LocalCluster", counting)
    local = extract(*pair, tmp_path / "local", budget_ratio=0.2)

    on_cluster = extract(*pair, tmp_path / "cluster", budget_ratio=0.2, cluster="local:1")

    assert started == [1]
    assert on_cluster.worst_error == local.worst_error
    _assert_same_adapter(tmp_path / "local", tmp_path / "cluster")


@pytest.mark.parametrize("route", ROUTES)
def test_a_nan_layer_on_a_cluster_exits_2_and_writes_nothing(
    tmp_path, run_cli, dask_cluster, pair, route
):
    base, tuned = pair
    tensors = load_file(tuned)
    broken = "model.layers.2.self_attn.v_proj.weight"
    tensors[broken] = tensors[broken].copy()
    tensors[broken][3, 5] = np.nan
    nan_tuned = write_checkpoint(tmp_path / "tuned.safetensors", tensors)
    out = tmp_path / "adapter"

    result = run_cli(
        "extract",
        base,
        nan_tuned,
        "-o",
        out,
        *_options(route),
        "--cluster",
        dask_cluster.scheduler.address,
    )

    assert_one_line_error(result, broken, "NaN")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [nan_tuned]
    assert _no_svdrank_tasks_left(dask_cluster)


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("local:0", ("local:N", "N ≥ 1")),
        ("tcp://127.0.0.1:1", ("tcp://127.0.0.1:1", "no Dask scheduler")),
        ("foo", ("--cluster foo", "missing port number")),
    ],
)
def test_a_cluster_address_that_cannot_work_is_one_line(
    tmp_path, run_cli, pair, monkeypatch, address, words
):
    monkeypatch.setattr(cluster_module, "CONNECT_SECONDS", 1)

    result = run_cli("extract", *pair, "-o", tmp_path / "adapter", "--cluster", address)

    assert_one_line_error(result, *words)
    assert list(tmp_path.iterdir()) == []


def test_resizing_an_adapter_refuses_the_cluster_option_with_one_line(tmp_path, run_cli):
    result = run_cli(
        "extract",
        SAMPLES / "adapter",
        "-o",
        tmp_path / "small",
        "--rank",
        "2",
        "--cluster",
        "local:2",
    )

    assert_one_line_error(result, "--cluster", "resizing an adapter")
    assert list(tmp_path.iterdir()) == []


DOOMED = "model.layers.1.self_attn.k_proj"


def _die_on_one_layer(layer, noise=False):
    """Form ΔW, except for DOOMED: its worker process dies there (as one out of memory does)."""
    if layer.module == DOOMED:
        os._exit(1)
    return form_delta(layer, noise)


def _allow_failures(count, dask_scheduler=None):
    dask_scheduler.allowed_failures = count


@pytest.mark.parametrize("route", ROUTES)
def test_a_layer_that_keeps_killing_its_workers_is_one_line(
    tmp_path, run_cli, dask_cluster, pair, route
):
    dask_cluster.run_on_scheduler(_allow_failures, 0)
    dask_cluster.run(setattr, extract_cluster, "form_delta", _die_on_one_layer)
    out = tmp_path / "adapter"
    try:
        result = run_cli(
            "extract",
            *pair,
            "-o",
            out,
            *_options(route),
            "--cluster",
            dask_cluster.scheduler.address,
        )
    finally:
        dask_cluster.run_on_scheduler(_allow_failures, 3)
        dask_cluster.wait_for_workers(2, timeout=60)
        dask_cluster.run(setattr, extract_cluster, "form_delta", form_delta)

    # The tasks queued on the dead worker fail with DOOMED, so the line may name one of them.
    assert_one_line_error(result, "died repeatedly", "out of memory", "Running on a cluster")
    assert list(tmp_path.iterdir()) == []
    assert _no_svdrank_tasks_left(dask_cluster)
