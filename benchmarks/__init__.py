"""Benchmark scripts, run as ``python benchmarks/NAME.py``; they import their siblings by name."""
