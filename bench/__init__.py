"""Benchmarks: `python -m bench` (see bench/bench.py)."""
