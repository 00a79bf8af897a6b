"""svdrank: how much rank does each layer's fine-tuning update really need?

>>> from svdrank import analyze, recommend
>>> analysis = analyze("base.safetensors", "tuned.safetensors")   # doctest: +SKIP
>>> balanced = recommend(analysis, preset="balanced")[0]          # doctest: +SKIP
"""

__version__ = "0.1.0"

from svdrank.analysis import Analysis, analyze
from svdrank.analysis_file import load_analysis, save_analysis
from svdrank.policy import RankPlan, recommend

__all__ = [
    "Analysis",
    "RankPlan",
    "__version__",
    "analyze",
    "load_analysis",
    "recommend",
    "save_analysis",
]
