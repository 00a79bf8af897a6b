"""Layers in parallel: ``auto``'s hint comes from one probe per kind, in two waves."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from svdrank.analysis import pipeline
from tests.conftest import DECAYS, write_decaying_pair


@pytest.fixture
def decaying_pair(tmp_path):
    return write_decaying_pair(tmp_path, blocks=4)


def _hinted(monkeypatch, before=None):
    """Record each layer's ``expect_slow`` hint by module (and run ``before`` first)."""
    hints: dict[str, bool] = {}
    real = pipeline.analyze_layer

    def analyze_layer(layer, formed, index, settings, kernels, expect_slow=False):
        if before is not None:
            before(layer)
        hints[layer.module] = expect_slow
        return real(layer, formed, index, settings, kernels, expect_slow)

    monkeypatch.setattr(pipeline, "analyze_layer", analyze_layer)
    return hints


def test_hints_and_spectra_do_not_depend_on_workers(decaying_pair, monkeypatch):
    runs = []
    for workers in (1, 3):
        hints = _hinted(monkeypatch)
        analysis = pipeline.analyze(*decaying_pair, workers=workers)
        runs.append((analysis, dict(hints)))

    (one, one_hints), (many, many_hints) = runs
    assert one_hints == many_hints
    # Block 0 holds each kind's probe (no hint); later blocks follow it: q and v needed
    # their whole spectrum there, k was truncated.
    for module, hint in one_hints.items():
        block, kind = int(module.split(".")[2]), module.rsplit(".", 1)[1]
        assert hint == (block > 0 and kind != "k_proj"), module
    assert [layer.module for layer in one.layers] == sorted(one_hints, key=_natural)
    for first, second in zip(one.layers, many.layers, strict=True):
        assert first.module == second.module
        assert np.array_equal(first.spectrum.values, second.spectrum.values)
        assert (first.spectrum.engine, first.spectrum.complete) == (
            second.spectrum.engine,
            second.spectrum.complete,
        )
        assert first.spectrum.total_energy == second.spectrum.total_energy
        assert first.noise == second.noise
    engines = {(layer.kind, layer.spectrum.engine, layer.spectrum.complete) for layer in one.layers}
    assert engines == {
        ("self_attn.q_proj", "gram", True),
        ("self_attn.v_proj", "gram", True),
        ("self_attn.k_proj", "randomized", False),
    }


def _natural(module: str) -> tuple[int, str]:
    return int(module.split(".")[2]), module


def test_layers_of_one_kind_are_decomposed_at_the_same_time(decaying_pair, monkeypatch):
    # Blocks 1 and 2 follow the same probe (block 0): with two workers both must be inside
    # the decomposition at once, or the barrier breaks (it never waits out its timeout
    # when they are).
    barrier = threading.Barrier(2, timeout=60)

    def meet(layer):
        if layer.block in (1, 2):
            barrier.wait()

    hints = _hinted(monkeypatch, meet)
    reported = []

    analysis = pipeline.analyze(
        *decaying_pair, include=["*q_proj*"], workers=2, progress=reported.append
    )

    assert [layer.block for layer in analysis.layers] == [0, 1, 2, 3]
    assert hints == {f"model.layers.{block}.self_attn.q_proj": block > 0 for block in range(4)}
    assert sorted(update.layer.module for update in reported) == sorted(hints)
    assert [update.layers_done for update in reported] == [1, 2, 3, 4]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_at_most_workers_plus_one_updates_are_in_memory(decaying_pair, monkeypatch, workers):
    held = {"now": 0, "most": 0}
    lock = threading.Lock()
    real_form, real_analyze = pipeline.form_delta, pipeline.analyze_layer

    def form_delta(*args, **kwargs):
        formed = real_form(*args, **kwargs)
        with lock:
            held["now"] += 1
            held["most"] = max(held["most"], held["now"])
        return formed

    def analyze_layer(*args, **kwargs):
        try:
            return real_analyze(*args, **kwargs)
        finally:
            with lock:
                held["now"] -= 1

    monkeypatch.setattr(pipeline, "form_delta", form_delta)
    monkeypatch.setattr(pipeline, "analyze_layer", analyze_layer)

    analysis = pipeline.analyze(*decaying_pair, workers=workers)

    assert len(analysis.layers) == 4 * len(DECAYS)
    assert held["now"] == 0
    assert held["most"] <= workers + 1
