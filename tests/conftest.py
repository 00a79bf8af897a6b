"""Shared fixtures: checkpoints written by the safetensors library itself, and the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import settings
from safetensors.numpy import save_file
from typer.testing import CliRunner

from svdrank.cli import app

# In CI the property tests draw the same examples every run, so a red build always
# means a change, never an unlucky draw; locally they keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_checkpoints"


def write_checkpoint(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """Write tensors with safetensors' own writer (an independent reference for our reader)."""
    # np.ascontiguousarray would turn a 0-d tensor (CLIP's logit_scale) into shape (1,).
    save_file({name: np.require(value, requirements="C") for name, value in tensors.items()}, path)
    return path


DECAYS = {"q_proj": ((160, 192), 0.3), "k_proj": ((320, 384), 1.5), "v_proj": ((160, 192), 0.6)}
"""Per kind: shape and α of σᵢ ~ i^-α. q and v decay too slowly for a sketch, k truncates."""


def write_decaying_pair(directory: Path, blocks: int = 4) -> tuple[Path, Path]:
    """Write a BF16 base/tuned pair of ``blocks`` attention blocks with slowly decaying updates.

    ΔW = G·diag(i^-α) for a Gaussian G, 5 % of ‖W‖ (as benchmarks/common.py's
    write_decaying_pair), so each kind's probe decides the ``auto`` hint of its
    later blocks: complete spectra for q and v, a truncated sketch for k.
    """
    rng = np.random.default_rng(7)
    base, tuned = {}, {}
    for block in range(blocks):
        for kind, (shape, alpha) in DECAYS.items():
            name = f"model.layers.{block}.self_attn.{kind}.weight"
            weight = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            decay = np.arange(1, shape[1] + 1, dtype=np.float32) ** np.float32(-alpha)
            delta = rng.standard_normal(shape, dtype=np.float32) * decay
            delta *= 0.05 * np.linalg.norm(weight) / np.linalg.norm(delta)
            base[name] = weight.astype(ml_dtypes.bfloat16)
            tuned[name] = (weight + delta).astype(ml_dtypes.bfloat16)
    return (
        write_checkpoint(directory / "base.safetensors", base),
        write_checkpoint(directory / "tuned.safetensors", tuned),
    )


@pytest.fixture
def run_cli():
    """Invoke the real command line; returns click's Result (stdout, stderr, exit_code)."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(arg) for arg in args])

    return invoke


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit 2, one ``svdrank: error:`` line on stderr naming each fragment, no traceback.

    ``result`` is click's Result (``run_cli``) or a finished ``subprocess.run``.
    """
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    assert code == 2, (code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("svdrank: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.fixture(scope="module")
def dask_cluster():
    """A client of a LocalCluster of 2 worker processes × 1 thread, one per test module."""
    import distributed  # the cluster extra: imported only by the modules that use it

    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as local,
        distributed.Client(local, set_as_default=False) as client,
    ):
        yield client
