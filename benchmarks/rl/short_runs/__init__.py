"""Short RL runs of the recipes on the embedded model (benchmarks/rl/results/short_runs.md)."""
