"""
Benchmarks of trl-micro, by role (each folder's README says what it holds and how to regenerate its results):
`harness` (the comparison behind BENCHMARKS.md: `python benchmarks/harness/run_all.py`, `make benchmark`), `studies`
(one question each, on the harness's pools), `rl` (policies trained against the rewards) and `performance` (what MiCRo
costs). The library never imports this package.
"""

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

CHECKOUT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def default_data_dir() -> str:
    """The benchmarks' real-data folder: `$TRL_MICRO_DATA_DIR`, else the checkout's `../shared/data`."""
    return os.environ.get("TRL_MICRO_DATA_DIR") or str(CHECKOUT_DATA_DIR)


def command_line(script: str, argv: Sequence[str]) -> str:
    """`python <script> <argv>` as a report quotes it: shell-quoted, with the home folder written `~` so that
    anyone can rerun it from a checkout (an unquoted `~/...` argument reaches the script expanded)."""
    home = str(Path.home()).rstrip(os.sep)

    def quoted(argument: str) -> str:
        if argument == home:
            return "~"
        if argument.startswith(home + os.sep):
            return "~/" + shlex.quote(argument[len(home) + 1 :])
        return shlex.quote(argument)

    return " ".join(["python", script, *map(quoted, argv)])
