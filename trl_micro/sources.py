"""
Where recipes get models and datasets by name: local files and directories as in TRL, plus the project's built-ins.

Datasets (`--dataset_name`):
- a local file (`.json`, `.jsonl`, `.json.gz`, `.jsonl.gz`, `.parquet`, `.csv`) or a directory (`save_to_disk` output
  or a folder of data files);
- `trl-micro/synthetic`: the synthetic personalized-preference generator (`--dataset_config` = number of
  subpopulations, default 2);
- `trl-micro/hh_relabeled`, `trl-micro/hh_rlhf`: the real preference data under `data_dir` (see `real_data`),
  split train / adaptation / test by context.

Models (`--model_name_or_path`): any local checkpoint, or `embedded` for the bundled SmolLM2-135M-Instruct.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

BUILTIN_DATASETS = ("trl-micro/synthetic", "trl-micro/hh_relabeled", "trl-micro/hh_rlhf")
EMBEDDED_MODEL = "embedded"
_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".gz": "json", ".parquet": "parquet", ".csv": "csv"}


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == EMBEDDED_MODEL:
        from .embedded import embedded_model_path

        return embedded_model_path()
    return name_or_path


def load_named_dataset(
    name: str, config: str | None = None, data_dir: str | None = None, seed: int = 0
) -> DatasetDict:
    """A `DatasetDict` for `name` (see the module docstring); built-ins have train / adaptation / test splits."""
    if name == "trl-micro/synthetic":
        from .synthetic import SyntheticPreferenceConfig, generate_synthetic_preferences

        num_subpopulations = int(config) if config else 2
        data = generate_synthetic_preferences(
            SyntheticPreferenceConfig(num_subpopulations=num_subpopulations, seed=seed)
        )
        return _split(data, seed)
    if name == "trl-micro/hh_relabeled":
        from .real_data import load_hh_relabeled

        return _split(load_hh_relabeled(data_dir=data_dir, seed=seed), seed)
    if name == "trl-micro/hh_rlhf":
        from .real_data import load_hh_rlhf

        return _split(load_hh_rlhf(data_dir=data_dir, seed=seed), seed)
    return load_local_dataset(name)


def _split(data: Dataset, seed: int) -> DatasetDict:
    from .real_data import split_by_context

    return split_by_context(data, context_column="context_id", seed=seed)


def load_local_dataset(path: str) -> DatasetDict:
    location = Path(path)
    if not location.exists():
        raise FileNotFoundError(
            f"Dataset {path!r} is neither a local file or directory nor one of {BUILTIN_DATASETS}. "
            "No dataset is downloaded from a hub: save it locally first (e.g. `Dataset.to_json`)."
        )
    if location.is_dir():
        if (location / "dataset_dict.json").exists() or (location / "dataset_info.json").exists():
            loaded = load_from_disk(str(location))
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
        return load_dataset(str(location))
    suffix = location.suffix
    if suffix not in _FILE_FORMATS:
        raise ValueError(f"Cannot read {path!r}: use one of {sorted(_FILE_FORMATS)} (or a directory).")
    return load_dataset(_FILE_FORMATS[suffix], data_files={"train": str(location)})

