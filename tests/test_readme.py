"""The README's examples, executed exactly as written.

Blocks fenced ``bash`` run with bash, blocks fenced ``python`` with this
interpreter, in order, in one scratch directory where ``sample_checkpoints/``
is the repository's. Blocks fenced ``sh`` (set-up with make) and ``py``
(fragments that need the reader's own model) are shown, not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLES

FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [(lang, body) for lang, body in FENCE.findall(text) if lang in ("bash", "python")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("readme")
    (directory / "sample_checkpoints").symlink_to(SAMPLES)
    return directory


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def test_readme_has_runnable_examples():
    languages = [lang for lang, _ in _blocks()]
    assert languages.count("bash") >= 3 and "python" in languages


def test_readme_examples_run_as_written(workspace):
    for language, body in _blocks():
        command = (
            ["bash", "-euo", "pipefail", "-c", body]
            if language == "bash"
            else [sys.executable, "-c", body]
        )
        result = subprocess.run(
            command, cwd=workspace, env=_environment(), capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{body}\n--- stderr ---\n{result.stderr}"
        assert "Traceback" not in result.stderr
    assert (workspace / "svdrank-analysis.json").is_file()
    assert (workspace / "ranks.json").read_text().startswith("{")
