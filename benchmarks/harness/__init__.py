"""The comparison harness: the pools, MiCRo against its baselines, their metrics and the report (BENCHMARKS.md)."""
