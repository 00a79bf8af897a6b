"""Run the package's docstring examples from the repository root.

The examples name the sample files by their path from the root
(``sample_checkpoints/base.safetensors``), so they hold wherever pytest is started.
"""

from __future__ import annotations

import pytest
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_in_root(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Change to the rootdir for a doctest; leave every other test where it is."""
    if isinstance(request.node, DoctestItem):
        monkeypatch.chdir(request.config.rootpath)
