"""
What trl-micro ships by name, and where datasets and models named on the command line come from.

Datasets (`--dataset_name`), in this order:
- a built-in: `trl-micro/synthetic` (the synthetic personalized-preference generator; `--dataset_config` = number of
  subpopulations, default 2), `trl-micro/hh_relabeled`, `trl-micro/hh_rlhf` (real preference data read from the data
  directory, see `trl_micro.bundled.data_dir`), each split train / adaptation / test by context, seeded; `trl-micro/dsp` (DSP's
  four domain contexts, split by query, plus a test split with context wordings adaptation never sees);
- a local file (`.json`, `.jsonl`, `.json.gz`, `.jsonl.gz`, `.parquet`, `.csv`) or directory (`save_to_disk` output or
  a folder of data files);
- anything else is a Hub dataset id, loaded as TRL's scripts load one: `datasets.load_dataset(name, config)`.

Models (`--model_name_or_path`): a local checkpoint, a Hub model id, or `embedded` for the bundled
SmolLM2-135M-Instruct (`trl_micro.bundled.embedded`). A Hub model id is checked up front (its `config.json` fetched
or found in the cache), so no network is a clear error naming the model and the offline setting.

There is no default data directory: the built-ins read `data_dir` or `$TRL_MICRO_DATA_DIR`.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

BUILTIN_DATASETS = ("trl-micro/synthetic", "trl-micro/hh_relabeled", "trl-micro/hh_rlhf", "trl-micro/dsp")
EMBEDDED_MODEL = "embedded"
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".gz": "json", ".parquet": "parquet", ".csv": "csv"}


def resolve_model_path(name_or_path: str, download: bool = False) -> str:
    """
    `embedded` -> the converted bundled model's directory; a local path is returned as it is; any other name is a
    Hub model id, returned once its config can be read or, with `download`, as the local folder of its files (the
    Hub cache's snapshot). A Hub id that cannot be read is an `OSError` naming it and the offline setting.
    """
    if name_or_path == EMBEDDED_MODEL:
        from .embedded import embedded_model_path

        return embedded_model_path()
    if Path(name_or_path).exists():
        return name_or_path
    from huggingface_hub import snapshot_download
    from transformers.utils import cached_file

    try:
        if download:
            return snapshot_download(name_or_path)
        cached_file(name_or_path, "config.json")
    except (OSError, ValueError) as error:
        raise OSError(
            f"Model {name_or_path!r} is not a local directory and could not be loaded from the Hugging Face Hub"
            f"{_offline_note()}: {str(error).rstrip('.')}. Check the name, download it where there is a network "
            f"(`hf download {name_or_path}`) and pass the local copy, or use `{EMBEDDED_MODEL}`."
        ) from error
    return name_or_path


def _offline_note() -> str:
    """` (offline mode is on: HF_HUB_OFFLINE=1)` when one of the offline settings is on, else nothing."""
    settings = [
        f"{name}={os.environ[name]}"
        for name in OFFLINE_ENV_VARS
        if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
    ]
    return f" (offline mode is on: {', '.join(settings)})" if settings else ""


def is_hub_dataset_name(name: str | None) -> bool:
    """Whether `load_named_dataset` reads `name` from the Hub: not a built-in, not a local path."""
    return bool(name) and not name.startswith("trl-micro/") and not Path(name).exists()


def load_named_dataset(name: str, config: str | None = None, data_dir: str | None = None, seed: int = 0) -> DatasetDict:
    """A `DatasetDict` for `name` (see the module docstring); built-ins have train / adaptation / test splits."""
    if name == "trl-micro/synthetic":
        from .synthetic import SyntheticPreferenceConfig, generate_synthetic_preferences

        num_subpopulations = int(config) if config else 2
        data = generate_synthetic_preferences(
            SyntheticPreferenceConfig(num_subpopulations=num_subpopulations, seed=seed)
        )
        return _split(data, seed)
    if name == "trl-micro/hh_relabeled":
        from .hh import load_hh_relabeled

        return _split(load_hh_relabeled(data_dir=data_dir, seed=seed), seed)
    if name == "trl-micro/hh_rlhf":
        from .hh import load_hh_rlhf

        return _split(load_hh_rlhf(data_dir=data_dir, seed=seed), seed)
    if name == "trl-micro/dsp":
        from .dsp import load_dsp

        return load_dsp(data_dir=data_dir, seed=seed)
    if name.startswith("trl-micro/"):
        raise ValueError(f"Unknown built-in dataset {name!r}; the built-ins are {BUILTIN_DATASETS}.")
    if not is_hub_dataset_name(name):
        return load_local_dataset(name, config)
    return load_hub_dataset(name, config)


def _split(data: Dataset, seed: int) -> DatasetDict:
    from ..splits import split_by_context

    return split_by_context(data, context_column="context_id", seed=seed)


def load_local_dataset(path: str, config: str | None = None) -> DatasetDict:
    """
    A local file or directory as a `DatasetDict` (a single file or dataset becomes the `train` split). A folder of
    data files is read as `datasets.load_dataset(path, config)` reads it (configs declared in its README.md).
    """
    location = Path(path)
    if not location.exists():
        raise FileNotFoundError(f"Dataset {path!r} is not a local file or directory.")
    if location.is_dir():
        if (location / "dataset_dict.json").exists() or (location / "dataset_info.json").exists():
            loaded = load_from_disk(str(location))
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
        return load_dataset(str(location), config)
    suffix = location.suffix
    if suffix not in _FILE_FORMATS:
        raise ValueError(f"Cannot read {path!r}: use one of {sorted(_FILE_FORMATS)} (or a directory).")
    return load_dataset(_FILE_FORMATS[suffix], data_files={"train": str(location)})


def load_hub_dataset(name: str, config: str | None = None) -> DatasetDict:
    """`datasets.load_dataset(name, config)`, as TRL's scripts call it; no network is a clear error naming `name`."""
    try:
        return load_dataset(name, config)
    except (ConnectionError, OSError) as error:
        raise FileNotFoundError(
            f"Dataset {name!r}{f' (config {config!r})' if config else ''} is not a built-in "
            f"({', '.join(BUILTIN_DATASETS)}), not a local file or directory, and could not be loaded from the Hugging Face Hub{_offline_note()}: "
            f"{str(error).rstrip('.')}. Check the name, download it where there is a network and pass the local copy, "
            "or use a built-in."
        ) from error
