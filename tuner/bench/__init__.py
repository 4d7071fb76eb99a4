"""Benchmarks of tuner's trainers against reference algorithms; `scripts/bench.py` runs them."""
