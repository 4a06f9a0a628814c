"""
Benchmarks of trl-micro, by role (each folder's README says what it holds and how to regenerate its results):
`harness` (the comparison behind BENCHMARKS.md: `python benchmarks/harness/run_all.py`, `make benchmark`), `studies`
(one question each, on the harness's pools), `rl` (policies trained against the rewards) and `performance` (what MiCRo
costs). The library never imports this package.
"""

import os
from pathlib import Path

CHECKOUT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def default_data_dir() -> str:
    """The benchmarks' real-data folder: `$TRL_MICRO_DATA_DIR`, else the checkout's `../shared/data`."""
    return os.environ.get("TRL_MICRO_DATA_DIR") or str(CHECKOUT_DATA_DIR)
