"""`make bench` starts: every benchmark suite imports against the package as it is laid out."""

from __future__ import annotations

import importlib

import pytest

from benchmarks.__main__ import SUITES


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_benchmark_suite_imports(suite):
    module = importlib.import_module(f"benchmarks.{suite}")
    assert callable(module.main)
