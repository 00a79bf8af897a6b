"""svdrank: measure how much rank each layer's fine-tuning update really needs.

>>> from svdrank import analyze, recommend
>>> analysis = analyze("base.safetensors", "tuned.safetensors")   # doctest: +SKIP
>>> balanced = recommend(analysis, preset="balanced")[0]          # doctest: +SKIP

The names below are imported on first use, so ``import svdrank`` stays light:
reading an analysis and recommending ranks never load SciPy.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from svdrank._version import __version__

_PUBLIC = {
    "analyze": "svdrank.analysis.pipeline",
    "extract": "svdrank.outputs.extract",
    "load_analysis": "svdrank.analysis.file",
    "save_analysis": "svdrank.analysis.file",
    "recommend": "svdrank.ranks.rules",
    "Analysis": "svdrank.types",
    "RankPlan": "svdrank.types",
}

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str) -> Any:
    """Import a public name from its stage on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'svdrank' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
