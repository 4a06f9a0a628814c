"""What trl-micro ships by name: built-in datasets, the embedded model, RL prompt sets (see `catalog`)."""

from .catalog import BUILTIN_DATASETS, load_named_dataset, resolve_model_path
from .data_dir import resolve_data_dir

__all__ = ["BUILTIN_DATASETS", "load_named_dataset", "resolve_data_dir", "resolve_model_path"]
