"""Inputs: checkpoint files and shards, pairing and naming, adapter reading."""
