"""`python -m benchmarks.render NAME`: rewrite results/NAME.md from results/NAME.json."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.__main__ import SUITES
from benchmarks.common import RESULTS


def renderer(name: str) -> Callable[[dict[str, Any]], str]:
    """The ``markdown`` function of the suite that wrote results/NAME.json."""
    return importlib.import_module(f"benchmarks.{name}").markdown


def main() -> None:
    """Re-render the named results (by default every suite's that has been run)."""
    names = sys.argv[1:] or [name for name in SUITES if (RESULTS / f"{name}.json").exists()]
    for name in names:
        record = json.loads((RESULTS / f"{name}.json").read_text())
        (RESULTS / f"{name}.md").write_text(renderer(name)(record))


if __name__ == "__main__":
    main()
