"""`make bench` starts (every suite imports); committed results are their records rendered."""

from __future__ import annotations

import importlib
import json

import pytest

from benchmarks.__main__ import SUITES
from benchmarks.common import RESULTS
from benchmarks.render import renderer


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_benchmark_suite_imports(suite):
    module = importlib.import_module(f"benchmarks.{suite}")
    assert callable(module.main)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_committed_results_are_their_records_rendered(suite):
    """Every results/NAME.md is what `python -m benchmarks.render NAME` makes of NAME.json."""
    record = RESULTS / f"{suite}.json"
    if not record.exists():
        pytest.skip(f"{suite} has no committed results (the gpu suite needs a CUDA device)")
    rendered = renderer(suite)(json.loads(record.read_text()))
    assert rendered == (RESULTS / f"{suite}.md").read_text()
