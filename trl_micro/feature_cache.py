r"""
Frozen-backbone features, stored once per distinct sequence.

With a frozen backbone the features of a sequence never change: h(x, y), what the heads read, and h(x), what the router
reads (the model's readouts, `trl_micro.modeling_micro`). The store keeps every reading a readout combines (the last
token's and the response mean's hidden state, the prompt's last token's and its mean:
`MiCRoRewardModel.compute_readings`), so models that read the same backbone and layer differently share one store.
They are computed once per distinct sequence, keyed by

    key = sha256(token ids, prompt length)        within a folder named by the backbone's fingerprint and the layer,

so a response that appears in several pairs, splits or datasets (the trainers, `trl-micro eval`, the benchmarks) runs
through the backbone once, and a dataset that grows computes only its new sequences. Sequences are batched by length,
so batches carry little padding.

On disk, `<root>/<fingerprint>-<causal>-<layer>/<segment>.safetensors`: each segment holds the readings of a batch of
new sequences (float32 tensors `last`, `mean`, `prompt_last`, `prompt_mean`, each (n, hidden)) with, in its metadata,
their keys and a SHA-256 of the tensor bytes. A segment is written to a temporary file and renamed into place, so no reader sees half of one, and every
writer writes segments of its own, so two processes filling one store lose nothing (a sequence both computed is
stored twice, with the same features). Every segment is checked when read (its header, shapes, hash and finiteness);
one that fails is named in a warning, deleted, and its sequences are computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data_utils import pad_right, pair_labels

logger = logging.getLogger(__name__)

FEATURE_NAMES = ("chosen_reward", "rejected_reward", "router")
CACHE_ENV_VAR = "TRL_MICRO_CACHE"
SEGMENT_FORMAT = "trl-micro-features-v2"
READINGS = ("last", "mean", "prompt_last", "prompt_mean")  # what `MiCRoRewardModel.compute_readings` returns

TokenSequence = tuple[Sequence[int], int]  # (token ids, number of prompt tokens)


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


def reward_model_fingerprint(model) -> str:
    """
    A stable hash of a MiCRo reward model's heads, router and backbone (`backbone_fingerprint`): what per-user weights
    over its heads refer to. Retraining the heads, or the backbone, changes it.
    """
    digest = hashlib.sha256(backbone_fingerprint(model.backbone).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(f"{model.base_model_prefix}."):
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def sequence_key(ids: Sequence[int], prompt_length: int) -> str:
    """The store key of one sequence: its token ids and where its prompt ends."""
    digest = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes())
    digest.update(int(prompt_length).to_bytes(8, "little"))
    return digest.hexdigest()[:32]


@torch.no_grad()
def compute_sequence_readings(
    model,
    sequences: Sequence[TokenSequence],
    batch_size: int = 16,
    device=None,
    desc: str = "Backbone features",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """One backbone pass per sequence, batched by length: `model.compute_readings` of each, (N, hidden), on the CPU
    (with a progress bar named `desc` unless `progress=False`)."""
    device = device or next(model.parameters()).device
    readings = {name: torch.empty(len(sequences), model.config.hidden_size) for name in READINGS}
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not order or not progress):
            rows = order[start : start + batch_size]
            input_ids = pad_right([sequences[i][0] for i in rows], 0).to(device)
            attention_mask = pad_right([[1] * len(sequences[i][0]) for i in rows], 0).to(device)
            prompt_lengths = torch.tensor([sequences[i][1] for i in rows], device=device)
            batch = model.compute_readings(input_ids, attention_mask, prompt_lengths)
            for name in READINGS:
                readings[name][rows] = batch[name].float().cpu()
    finally:
        model.train(was_training)
    return readings


def compute_sequence_features(
    model, sequences: Sequence[TokenSequence], batch_size: int = 16, device=None, desc: str = "Backbone features"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward features, router features) of `sequences` as `model` reads them, (N, reward_feature_size) and
    (N, hidden), on the CPU: one backbone pass per sequence, batched by length."""
    return model.features_from_readings(compute_sequence_readings(model, sequences, batch_size, device, desc))


class FeatureStore:
    """
    The readings of `model`'s backbone per distinct sequence, on disk under `root` (default
    `$TRL_MICRO_CACHE/features`), given as `model`'s readouts read them; see the module docstring.

    Args:
        model: a `MiCRoRewardModel` (only its backbone, `config.backbone_is_causal` and its readouts matter).
        root (`str` or `Path`, *optional*): the store's root folder.
        segment_size (`int`, defaults to 1024): new sequences per segment file; a long computation is saved segment by
            segment, so an interrupted one resumes where it stopped.

    Attributes `num_computed` and `num_reused` count the distinct sequences of the last [`features`] call that ran
    through the backbone and that were read from the store.
    """

    def __init__(self, model, root: str | os.PathLike | None = None, segment_size: int = 1024):
        if segment_size < 1:
            raise ValueError(f"FeatureStore.segment_size must be >= 1, got {segment_size}.")
        self.model = model
        fingerprint = backbone_fingerprint(model.backbone)
        causal = "causal" if model.config.backbone_is_causal else "bidirectional"
        layer = model.config.reward_layer_name
        self.directory = (Path(root) if root is not None else cache_root() / "features") / (
            f"{fingerprint}-{causal}-{layer}"
        )
        self.segment_size = segment_size
        self.num_computed = self.num_reused = 0

    def features(
        self, sequences: Sequence[TokenSequence], batch_size: int = 16, device=None, desc: str = "Backbone features"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward features, router features), float32 on the CPU, of `sequences` in their order."""
        keys = [sequence_key(ids, prompt_length) for ids, prompt_length in sequences]
        first_row = {}
        for row, key in enumerate(keys):
            first_row.setdefault(key, row)
        stored = self._read(set(first_row))
        missing = [key for key in first_row if key not in stored]
        for start in range(0, len(missing), self.segment_size):
            chunk = missing[start : start + self.segment_size]
            readings = compute_sequence_readings(
                self.model, [sequences[first_row[key]] for key in chunk], batch_size, device, desc
            )
            self._write(chunk, readings)
            stored.update({key: {name: readings[name][i] for name in READINGS} for i, key in enumerate(chunk)})
        self.num_computed, self.num_reused = len(missing), len(first_row) - len(missing)
        hidden = self.model.config.hidden_size
        readings = {
            name: torch.stack([stored[key][name] for key in keys]) if keys else torch.empty(0, hidden)
            for name in READINGS
        }
        return self.model.features_from_readings(readings)

    # ------------------------------------------------------------------------------------------------------ disk
    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("*.safetensors"))

    def _read(self, wanted: set[str]) -> dict[str, dict[str, torch.Tensor]]:
        """The stored readings of the keys in `wanted`; segments that fail their checks are dropped (with a warning)."""
        found: dict[str, dict[str, torch.Tensor]] = {}
        for path in self.segments():
            if wanted.issubset(found):
                break
            try:
                keys, readings = self._load_segment(path, wanted - set(found))
            except FileNotFoundError:
                continue  # deleted by another process meanwhile
            except (SafetensorError, ValueError, KeyError, OSError, json.JSONDecodeError) as error:
                warnings.warn(f"Feature store: {path} is damaged ({error}); deleting it, its sequences are recomputed.")
                path.unlink(missing_ok=True)
                continue
            found.update({key: {name: readings[name][i] for name in READINGS} for i, key in enumerate(keys)})
        return found

    def _load_segment(self, path: Path, wanted: set[str]) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The rows of `path` whose keys are in `wanted`, after checking the whole segment."""
        with safe_open(str(path), framework="pt") as segment:
            metadata = segment.metadata() or {}
            if metadata.get("format") != SEGMENT_FORMAT:
                raise ValueError(f"not a {SEGMENT_FORMAT} segment")
            keys = json.loads(metadata["keys"])
            if not any(key in wanted for key in keys):
                return [], {}
            readings = {name: segment.get_tensor(name) for name in READINGS}
        expected = (len(keys), self.model.config.hidden_size)
        shapes = {name: tuple(tensor.shape) for name, tensor in readings.items()}
        if any(shape != expected for shape in shapes.values()):
            raise ValueError(f"tensors of shapes {shapes}, expected {expected} each")
        if _digest(readings) != metadata["sha256"]:
            raise ValueError("its data do not match their SHA-256")
        if not all(torch.isfinite(tensor).all() for tensor in readings.values()):
            raise ValueError("it holds non-finite features")
        rows = [i for i, key in enumerate(keys) if key in wanted]
        return [keys[i] for i in rows], {name: tensor[rows] for name, tensor in readings.items()}

    def add(self, keys: list[str], readings: dict[str, torch.Tensor]) -> None:
        """Store readings (`compute_readings`'s, one row per key) computed elsewhere, e.g. while scoring feedback."""
        if keys:
            self._write(keys, readings)

    def _write(self, keys: list[str], readings: dict[str, torch.Tensor]) -> None:
        """Save one segment atomically: a temporary file in the same folder, renamed into place; removed on failure."""
        if not all(torch.isfinite(tensor).all() for tensor in readings.values()):
            raise ValueError(
                "The backbone produced non-finite features (NaN or infinity); check the backbone's weights and dtype "
                "(fp16 overflows on some models: load it in float32 or bfloat16)."
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        metadata = {"format": SEGMENT_FORMAT, "keys": json.dumps(keys), "sha256": _digest(readings)}
        descriptor, temporary = tempfile.mkstemp(prefix=".segment-", suffix=".tmp", dir=self.directory)
        os.close(descriptor)
        try:
            save_file({name: readings[name].contiguous() for name in READINGS}, temporary, metadata=metadata)
            os.replace(temporary, self.directory / f"{uuid.uuid4().hex}.safetensors")
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)


def _digest(readings: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in READINGS:
        digest.update(readings[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------- pairs
def pair_sequences(dataset: Dataset) -> list[TokenSequence]:
    """The 2N sequences of N tokenized pairs: every chosen sequence, then every rejected one."""
    return list(zip(dataset["chosen_ids"], dataset["chosen_prompt_length"])) + list(
        zip(dataset["rejected_ids"], dataset["rejected_prompt_length"])
    )


def pair_features(
    model,
    dataset: Dataset,
    cache_dir: str | os.PathLike | None = None,
    use_store: bool = True,
    batch_size: int = 16,
    device=None,
    desc: str = "Backbone features",
) -> dict[str, torch.Tensor]:
    """
    `{chosen_reward, rejected_reward, router}`, (N, reward_feature_size) and (N, hidden), of the N tokenized pairs of
    `dataset` (columns of
    `data_utils.TOKENIZED_COLUMNS`); the router reads the chosen sequence's prompt. With `use_store`, through the
    [`FeatureStore`] under `cache_dir` (default root when None); otherwise computed, each distinct sequence once.
    """
    sequences = pair_sequences(dataset)
    if use_store:
        store = FeatureStore(model, cache_dir)
        reward, router = store.features(sequences, batch_size, device, desc)
        logger.info(
            "%s: %d distinct sequences computed, %d read from %s.",
            desc,
            store.num_computed,
            store.num_reused,
            store.directory,
        )
    else:
        keys = [sequence_key(*sequence) for sequence in sequences]
        distinct = dict(zip(keys, sequences))
        index = {key: row for row, key in enumerate(distinct)}
        distinct_reward, distinct_router = compute_sequence_features(
            model, list(distinct.values()), batch_size, device, desc
        )
        rows = torch.tensor([index[key] for key in keys], dtype=torch.long)
        reward, router = distinct_reward[rows], distinct_router[rows]
    num_pairs = len(dataset)
    return {"chosen_reward": reward[:num_pairs], "rejected_reward": reward[num_pairs:], "router": router[:num_pairs]}


class CachedFeatureCollator:
    """
    A bank of pair features and the collator that batches them by `pair_index`, laid out like token batches: chosen
    rows first, then rejected rows. Each prepared dataset (train, eval) is appended to the bank.
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
            "reward_features": torch.cat(
                [self.features["chosen_reward"][rows], self.features["rejected_reward"][rows]]
            ),
            "router_features": torch.cat([router, router]),
        }
        batch.update(pair_labels(examples))
        return batch
