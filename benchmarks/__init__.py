"""Benchmarks for svdrank: `make bench` (python -m benchmarks) writes benchmarks/results/."""
