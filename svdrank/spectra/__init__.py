"""Spectra: arrays in, arrays out: LAPACK calls, kernels, engine choice, energy."""
