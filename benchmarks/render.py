"""`python -m benchmarks.render NAME`: rewrite results/NAME.md from results/NAME.json."""

from __future__ import annotations

import json
import sys

from benchmarks import eigensolvers, engines, extraction, pipeline, plots
from benchmarks.common import RESULTS

RENDERERS = {
    "engines": engines.markdown,
    "eigensolvers": eigensolvers.markdown,
    "pipeline": pipeline.markdown,
    "plots": plots.markdown,
    "extraction": extraction.markdown,
}


def main() -> None:
    """Re-render the named results (all of them by default)."""
    for name in sys.argv[1:] or list(RENDERERS):
        record = json.loads((RESULTS / f"{name}.json").read_text())
        (RESULTS / f"{name}.md").write_text(RENDERERS[name](record))


if __name__ == "__main__":
    main()
