"""Benchmarks: speed and accuracy tables, run from the repository root."""
