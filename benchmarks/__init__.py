"""
Benchmarks of trl-micro, by role (each folder's README says what it holds and how to regenerate its results):
`harness` (the comparison behind BENCHMARKS.md: `python -m benchmarks.harness.run_all`, `make benchmark`), `studies`
(one question each, on the harness's pools), `rl` (policies trained against the rewards) and `performance` (what MiCRo
costs). Every script runs from the repository root as a module, `python -m benchmarks.<folder>.<script>`. The library
never imports this package.

What every script shares lives here: the real-data folder, the command line a report quotes, the logging set-up, the
stopwatch of a run's stages and the writing of a report.
"""

import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

CHECKOUT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

logger = logging.getLogger("benchmarks")


def default_data_dir() -> str:
    """The benchmarks' real-data folder: `$TRL_MICRO_DATA_DIR`, else the checkout's `../shared/data`."""
    return os.environ.get("TRL_MICRO_DATA_DIR") or str(CHECKOUT_DATA_DIR)


def command_line(module: str, argv: Sequence[str]) -> str:
    """`python -m <module> <argv>` as a report quotes it (`module` dotted, e.g. `benchmarks.rl.best_of_n`):
    shell-quoted, with the home folder written `~` so that anyone can rerun it from a checkout (an unquoted `~/...`
    argument reaches the script expanded)."""
    home = str(Path.home()).rstrip(os.sep)

    def quoted(argument: str) -> str:
        if argument == home:
            return "~"
        if argument.startswith(home + os.sep):
            return "~/" + shlex.quote(argument[len(home) + 1 :])
        return shlex.quote(argument)

    return " ".join(["python", "-m", module, *map(quoted, argv)])


@contextmanager
def stopwatch(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Adds the wall time of the `with` block to `seconds[name]` (0 before the first), an exception or not."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def start_logging() -> None:
    """INFO lines with time and logger name; transformers' own logging down to its errors."""
    import transformers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()


def write_study_report(
    output: Path, module: str, argv: Sequence[str], result: dict, render: Callable[[dict, str], str]
) -> None:
    """Write a study's Markdown (`render(result, command)`, the command `python -m <module> <argv>`) and its JSON
    (the command and `result`) next to it."""
    command = command_line(module, argv)
    output.write_text(render(result, command), encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=1), encoding="utf-8")
    logger.info("Wrote %s", output)
