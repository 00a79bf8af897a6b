"""Resumable runs: finished layers go to OUTPUT.resume, and `diff --resume` computes the rest."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
from safetensors.numpy import load_file

from svdrank.analysis import pipeline
from tests.conftest import DECAYS, assert_one_line_error, write_checkpoint, write_decaying_pair

LAYERS = 4 * len(DECAYS)


@pytest.fixture
def pair(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    return write_decaying_pair(folder, blocks=4)


def _counting(monkeypatch, stop_after=None):
    """Count the layers decomposed; raise KeyboardInterrupt at decomposition stop_after + 1."""
    calls = []
    real = pipeline.analyze_layer

    def analyze_layer(layer, *args, **kwargs):
        calls.append(layer.module)
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(pipeline, "analyze_layer", analyze_layer)
    return calls


def _layers(path):
    """The analysis file's layer records without their timings."""
    record = json.loads(path.read_text())
    return [{k: v for k, v in layer.items() if k != "seconds"} for layer in record["layers"]]


def _logged(log):
    """The layer lines of a results log (the header left out)."""
    return log.read_text().splitlines()[1:]


def _interrupt(run_cli, monkeypatch, pair, out, stop_after, *options):
    """Run `diff` until Ctrl-C after ``stop_after`` layers; return the result."""
    _counting(monkeypatch, stop_after)
    result = run_cli("diff", *pair, "-o", out, "--format", "json", *options)
    # Layers already running when Ctrl-C came finish in their worker threads (the CLI's
    # process would exit; this test's goes on): let them end before anything is counted.
    for thread in threading.enumerate():
        if thread.name.startswith("svdrank-"):
            thread.join(timeout=120)
    monkeypatch.undo()
    return result


@pytest.fixture
def uninterrupted(tmp_path, pair, run_cli):
    out = tmp_path / "whole.json"
    result = run_cli("diff", *pair, "-o", out, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize(
    ("stop_after", "workers"),
    [(2, "1"), (7, "1"), (5, "3")],
    ids=["inside-the-probes", "after-the-probes", "three-workers"],
)
def test_a_resumed_run_computes_only_the_rest_and_gives_the_same_analysis(
    tmp_path, pair, run_cli, monkeypatch, uninterrupted, stop_after, workers
):
    out = tmp_path / "a.json"
    log = tmp_path / "a.json.resume"

    result = _interrupt(run_cli, monkeypatch, pair, out, stop_after, "--workers", workers)

    assert result.exit_code == 130, result.stderr
    assert "--resume" in result.stderr
    assert not out.exists()
    logged = len(_logged(log))
    assert 0 < logged <= stop_after
    calls = _counting(monkeypatch)

    result = run_cli("diff", *pair, "-o", out, "--format", "json", "--resume")

    assert result.exit_code == 0, result.stderr
    assert len(calls) == LAYERS - logged
    assert _layers(out) == _layers(uninterrupted)
    assert not log.exists()


def test_a_resumed_run_tells_progress_about_every_layer_once(tmp_path, pair, monkeypatch):
    log = tmp_path / "run.resume"
    _counting(monkeypatch, stop_after=4)
    with pytest.raises(KeyboardInterrupt):
        pipeline.analyze(*pair, results_log=log)
    monkeypatch.undo()
    reported = []

    analysis = pipeline.analyze(*pair, results_log=log, resume=True, progress=reported.append)

    assert [update.layers_done for update in reported] == list(range(1, LAYERS + 1))
    assert sorted(update.layer.module for update in reported) == sorted(
        layer.module for layer in analysis.layers
    )
    assert log.exists()  # the caller removes it once the analysis is saved


def test_without_resume_a_new_run_replaces_the_log(tmp_path, pair, run_cli, monkeypatch):
    out = tmp_path / "a.json"
    _interrupt(run_cli, monkeypatch, pair, out, 6)
    _interrupt(run_cli, monkeypatch, pair, out, 2)

    assert len(_logged(tmp_path / "a.json.resume")) == 2


def test_resume_without_a_log_computes_every_layer(tmp_path, pair, run_cli, monkeypatch):
    calls = _counting(monkeypatch)

    result = run_cli("diff", *pair, "-o", tmp_path / "a.json", "--resume", "--format", "json")

    assert result.exit_code == 0, result.stderr
    assert len(calls) == LAYERS
    assert list(tmp_path.glob("*.resume")) == []


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (("--seed", "1"), ("seed was 0, now 1",)),
        (("--max-energy", "0.9"), ("max_energy was 0.95, now 0.9",)),
        (("--noise", "off"), ("noise was 'auto', now 'off'",)),
        (("--include", "*q_proj*"), ("include was [], now ['*q_proj*']",)),
    ],
)
def test_resume_with_other_settings_is_one_line_and_keeps_the_log(
    tmp_path, pair, run_cli, monkeypatch, options, fragments
):
    out = tmp_path / "a.json"
    log = tmp_path / "a.json.resume"
    _interrupt(run_cli, monkeypatch, pair, out, 4)
    before = log.read_bytes()

    result = run_cli("diff", *pair, "-o", out, "--resume", *options)

    assert_one_line_error(result, str(log), "another run", "without --resume", *fragments)
    assert log.read_bytes() == before
    assert not out.exists()


def test_resume_with_another_tuned_checkpoint_is_one_line(tmp_path, pair, run_cli, monkeypatch):
    out = tmp_path / "a.json"
    log = tmp_path / "a.json.resume"
    _interrupt(run_cli, monkeypatch, pair, out, 4)
    before = log.read_bytes()
    base, tuned = pair
    # A later save of the same training run: the same names, shapes and header, other values.
    tensors = load_file(tuned)
    write_checkpoint(tuned, {name: value * 2 for name, value in tensors.items()})
    os.utime(tuned, (tuned.stat().st_atime + 60, tuned.stat().st_mtime + 60))

    result = run_cli("diff", base, tuned, "-o", out, "--resume")

    assert_one_line_error(result, "another run", "the tuned checkpoint differs")
    assert log.read_bytes() == before


def test_a_moved_checkpoint_with_its_times_still_resumes(tmp_path, pair, run_cli, monkeypatch):
    out = tmp_path / "a.json"
    _interrupt(run_cli, monkeypatch, pair, out, 4)
    moved = tmp_path / "moved"
    pair[0].parent.rename(moved)
    calls = _counting(monkeypatch)

    result = run_cli("diff", *(moved / path.name for path in pair), "-o", out, "--resume")

    assert result.exit_code == 0, result.stderr
    assert len(calls) == LAYERS - 4


def test_a_log_of_another_kind_is_refused_and_kept(tmp_path, pair, run_cli):
    log = tmp_path / "a.json.resume"
    log.write_text('{"schema": "svdrank.analysis/3"}\n')

    result = run_cli("diff", *pair, "-o", tmp_path / "a.json", "--resume")

    assert_one_line_error(result, str(log), "not a results log")
    assert log.read_text() == '{"schema": "svdrank.analysis/3"}\n'


def test_the_log_is_removed_after_a_bad_input_error(tmp_path, run_cli, monkeypatch):
    rng = np.random.default_rng(3)
    base = {f"layers.{i}.proj.weight": rng.standard_normal((40, 30), np.float32) for i in range(6)}
    tuned = {name: weight + np.float32(0.1) for name, weight in base.items()}
    tuned["layers.4.proj.weight"][3, 7] = np.nan
    pair = (
        write_checkpoint(tmp_path / "b.safetensors", base),
        write_checkpoint(tmp_path / "t.safetensors", tuned),
    )
    out = tmp_path / "a.json"
    _interrupt(run_cli, monkeypatch, pair, out, 2)
    assert len(_logged(tmp_path / "a.json.resume")) == 2

    result = run_cli("diff", *pair, "-o", out, "--resume")

    assert_one_line_error(result, "layers.4.proj.weight", "NaN or Inf")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["b.safetensors", "t.safetensors"]


@pytest.mark.parametrize(
    "damage",
    ["torn", "garbage", "wrong-module", "repeated"],
)
def test_a_damaged_last_line_is_computed_again(
    tmp_path, pair, run_cli, monkeypatch, uninterrupted, damage
):
    out = tmp_path / "a.json"
    log = tmp_path / "a.json.resume"
    _interrupt(run_cli, monkeypatch, pair, out, 5)
    lines = log.read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])
    damaged = {
        "torn": lines[-1][: len(lines[-1]) // 2],
        "garbage": b"\x00\x00\x00\x00\n",
        "wrong-module": json.dumps({**last, "index": (last["index"] + 1) % LAYERS}).encode()
        + b"\n",
        "repeated": lines[-2] if len(lines) > 2 else lines[-1],
    }[damage]
    log.write_bytes(b"".join([*lines[:-1], damaged]))
    calls = _counting(monkeypatch)

    result = run_cli("diff", *pair, "-o", out, "--format", "json", "--resume")

    assert result.exit_code == 0, result.stderr
    assert len(calls) == LAYERS - (len(lines) - 2)
    assert _layers(out) == _layers(uninterrupted)
    assert not log.exists()
