"""svdrank: how much rank does each layer's fine-tuning update really need?"""

__version__ = "0.1.0"
