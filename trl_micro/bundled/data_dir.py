"""Where the built-in datasets' real preference data lives: a folder given by argument or by `$TRL_MICRO_DATA_DIR`."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV_VAR = "TRL_MICRO_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """
    The folder of the real preference data the built-in datasets read: `data_dir` if given, else the
    `TRL_MICRO_DATA_DIR` environment variable. Raises `FileNotFoundError` naming what was tried and how to fix it.
    """
    if data_dir is not None:
        path, origin = Path(data_dir), "the data_dir argument"
    elif os.environ.get(DATA_DIR_ENV_VAR):
        path, origin = Path(os.environ[DATA_DIR_ENV_VAR]), f"the {DATA_DIR_ENV_VAR} environment variable"
    else:
        raise FileNotFoundError(
            f"No preference data directory given. Pass data_dir=... (`--data_dir` on the command line) or set the "
            f"{DATA_DIR_ENV_VAR} environment variable to the folder holding hh_relabeled/, hh_rlhf/ and dsp/."
        )
    if not path.is_dir():
        raise FileNotFoundError(
            f"Preference data directory {str(path)!r} (from {origin}) does not exist. Pass data_dir=... or set the "
            f"{DATA_DIR_ENV_VAR} environment variable to the folder holding hh_relabeled/, hh_rlhf/ and dsp/."
        )
    return path
