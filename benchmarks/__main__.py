"""`python -m benchmarks [engines|pipeline ...]`: run the benchmarks, write results/."""

from __future__ import annotations

import sys

from benchmarks import (
    cluster,
    eigensolvers,
    engines,
    extraction,
    gpu,
    noise,
    pipeline,
    plots,
    scaling,
)

SUITES = {
    "engines": engines.main,
    "eigensolvers": eigensolvers.main,
    "pipeline": pipeline.main,
    "plots": plots.main,
    "extraction": extraction.main,
    "noise": noise.main,
    "cluster": cluster.main,
    "scaling": scaling.main,
    "gpu": gpu.main,
}


def main() -> None:
    """Run the suites named on the command line, or all of them."""
    for name in sys.argv[1:] or list(SUITES):
        SUITES[name]()


if __name__ == "__main__":
    main()
