"""Benchmarks of trl-micro: `python benchmarks/run_all.py` (`make benchmark`) regenerates BENCHMARKS.md."""
