"""
Benchmarks of trl-micro: `python benchmarks/run_all.py` (`make benchmark`) regenerates BENCHMARKS.md. The library
never imports this package; it holds the comparison harness (`comparison`, `pair_pool`, `preference_pools`), the
studies and their metrics (`study_metrics`), and the report.
"""

import os
from pathlib import Path

CHECKOUT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def default_data_dir() -> str:
    """The benchmarks' real-data folder: `$TRL_MICRO_DATA_DIR`, else the checkout's `../shared/data`."""
    return os.environ.get("TRL_MICRO_DATA_DIR") or str(CHECKOUT_DATA_DIR)
