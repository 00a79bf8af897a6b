"""Ranks: rank rules and presets, budgets, and the checks of the CI gate."""
