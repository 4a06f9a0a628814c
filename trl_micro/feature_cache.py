"""
Frozen-backbone feature cache.

When the backbone is frozen, each pair's backbone features never change: the chosen and rejected sequences' last-token
hidden states and the last prompt token's hidden state. They are computed once (sorted by length so batches carry
little padding), saved as safetensors under a key made of the backbone's fingerprint and the tokenized data's
fingerprint, and every epoch after that trains heads and router on them, without running the backbone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data_utils import TOKENIZED_COLUMNS, pad_right, pair_labels

FEATURE_NAMES = ("chosen_reward", "rejected_reward", "router")


CACHE_ENV_VAR = "TRL_MICRO_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of trl-micro's caches: `cache_dir`, else `$TRL_MICRO_CACHE`, else `~/.cache/trl_micro`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    return Path.home() / ".cache" / "trl_micro"


def backbone_fingerprint(backbone: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A cheap, stable hash of a backbone: its config and a strided sample of every weight tensor."""
    digest = hashlib.sha256()
    config = getattr(backbone, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
        digest.update(str(getattr(config, "_attn_implementation", None)).encode())  # not in the JSON; changes features
    for name, tensor in sorted(backbone.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat[::stride].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset: Dataset, columns: tuple[str, ...]) -> str:
    """Hash of the token ids and prompt lengths that the features are computed from."""
    digest = hashlib.sha256()
    table = dataset.with_format("arrow")[:]
    for column in columns:
        array = table.column(column).combine_chunks()
        if hasattr(array, "offsets"):
            digest.update(np.asarray(array.offsets).tobytes())
            array = array.values
        digest.update(np.asarray(array).tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def compute_pair_features(model, dataset: Dataset, batch_size: int = 16, device=None, desc: str = "Backbone features"):
    """Run the backbone over every pair once; returns {name: (N, hidden)} on the CPU, in the dataset's order."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    sequences = [("chosen_ids", "chosen_prompt_length", "chosen_reward"), ("rejected_ids", "rejected_prompt_length", "rejected_reward")]
    hidden = model.config.hidden_size
    num_pairs = len(dataset)
    features = {name: torch.empty(num_pairs, hidden, dtype=torch.float32) for name in FEATURE_NAMES}
    total = 2 * -(-num_pairs // batch_size)
    with tqdm(total=total, desc=desc, unit="batch") as progress:
        for ids_column, length_column, name in sequences:
            all_ids = dataset[ids_column]
            all_lengths = dataset[length_column]
            order = sorted(range(num_pairs), key=lambda i: len(all_ids[i]))
            for start in range(0, num_pairs, batch_size):
                rows = order[start : start + batch_size]
                input_ids = pad_right([all_ids[i] for i in rows], 0).to(device)
                attention_mask = pad_right([[1] * len(all_ids[i]) for i in rows], 0).to(device)
                prompt_lengths = torch.tensor([all_lengths[i] for i in rows], device=device)
                reward_features, router_features = model.compute_features(input_ids, attention_mask, prompt_lengths)
                features[name][rows] = reward_features.float().cpu()
                if name == "chosen_reward":
                    features["router"][rows] = router_features.float().cpu()
                progress.update(1)
    model.train(was_training)
    return features


def load_or_compute_pair_features(
    model, dataset: Dataset, cache_dir: str | os.PathLike | None = None, batch_size: int = 16, device=None, desc=None
) -> tuple[dict[str, torch.Tensor], Path]:
    """The cached features of `dataset` under `model`'s backbone, computing and saving them on a miss."""
    key = {
        "backbone": backbone_fingerprint(model.backbone),
        "data": dataset_fingerprint(dataset, TOKENIZED_COLUMNS),
        "causal": bool(model.config.backbone_is_causal),
    }
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "features"
    path = root / f"{name}.safetensors"
    if path.exists():
        features = load_file(str(path))
        if set(features) == set(FEATURE_NAMES) and all(len(t) == len(dataset) for t in features.values()):
            return features, path
    features = compute_pair_features(model, dataset, batch_size=batch_size, device=device, desc=desc or "Backbone features")
    root.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in features.items()}, str(temporary), metadata={"key": json.dumps(key)})
    os.replace(temporary, path)
    return features, path


class CachedFeatureCollator:
    """
    A bank of cached pair features and the collator that batches them by `pair_index`, laid out like token batches:
    chosen rows first, then rejected rows. Each prepared dataset (train, eval) is appended to the bank.
    """

    def __init__(self):
        self.features: dict[str, torch.Tensor] | None = None

    def add(self, features: dict[str, torch.Tensor]) -> int:
        """Append a dataset's features; returns the `pair_index` of its first pair."""
        if self.features is None:
            self.features = {name: features[name] for name in FEATURE_NAMES}
            return 0
        offset = len(self.features["router"])
        self.features = {name: torch.cat([self.features[name], features[name]]) for name in FEATURE_NAMES}
        return offset

    def __call__(self, examples):
        rows = torch.tensor([example["pair_index"] for example in examples], dtype=torch.long)
        router = self.features["router"][rows]
        batch = {
            "reward_features": torch.cat([self.features["chosen_reward"][rows], self.features["rejected_reward"][rows]]),
            "router_features": torch.cat([router, router]),
        }
        batch.update(pair_labels(examples))
        return batch
