r"""
MiCRo reward model: one backbone, K linear Bradley-Terry heads and a router that reads the prompt.

For a prompt x and response y, with h(x, y) the backbone's reading of the whole sequence and h(x) its reading of the
prompt (the readouts, `config.reward_readout`, `config.reward_layer`, `config.router_readout`):

    h(x, y) = H_T                                  "last": hidden state at the sequence's last token T
            = mean_{t in y} H_t                    "mean": mean over the response's tokens
            = [H_T ; mean_{t in y} H_t]            "last_mean": both, concatenated
    h(x)    = H_P  or  mean_{t <= P} H_t           "last" / "mean" of the prompt, P its last token

with H the hidden states of the layer `reward_layer` (the backbone's output by default) for h(x, y), of the output
for h(x); then

    r_k(x, y) = u_k . h(x, y)                      (K heads, kept in float32; so is the router)
    w(x)      = softmax(router(n(h(x))))           (router: linear or MLP; or one global vector, StaticMixture)
    r(x, y)   = sum_k w_k(x) r_k(x, y)             (the routed reward, `logits`: `routed_reward`)

where n standardizes the prompt feature over its hidden dimensions, n(h) = (h - mean(h)) / std(h)
(`config.router_input_norm`; the identity when off). A context (user, criterion, persona) personalizes the reward
by being part of the prompt the router reads.

Saving copies this file and `configuration_micro.py` beside the weights, with their `auto_map` (see
`configuration_micro`), so `AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)` loads a
checkpoint where trl_micro is not installed (TRL's own `trl grpo --reward_model_name_or_path`, other tools). Keep the
imports of both files to torch, transformers and each other (peft is imported only to load a LoRA run's folder).

A LoRA run's folder (what `MiCRoRewardTrainer` saves with a `peft_config`) holds PEFT's adapter (LoRA weights, heads
and router) beside this code and `config.json`, and no model weights: `from_pretrained` of that folder loads the base
model the adapter names (`base_model_name_or_path`: the backbone, or the MiCRo checkpoint the run started from), applies
the adapter and merges it, so the folder loads like a full checkpoint.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import MODEL_MAPPING, AutoModel, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import ModelOutput

from .configuration_micro import MiCRoConfig, check_checkpoint_matches, check_model_path, checkpoint_model_type


@dataclass
class MiCRoRewardOutput(ModelOutput):
    """
    Output of [`MiCRoRewardModel`].

    Args:
        logits (`(batch, 1)`): the routed reward (`routed_reward`); what TRL reads as the reward.
        head_rewards (`(batch, K)`): r_k for every head.
        router_logits (`(batch, K)`): the router's logits; `mixture_weights` is their softmax unless overridden.
        mixture_weights (`(batch, K)`): the weights that made `logits`.
        reward_features (`(batch, reward_feature_size)`), router_features (`(batch, hidden)`): the backbone
            features the heads and router read.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    head_rewards: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    mixture_weights: torch.Tensor | None = None
    reward_features: torch.Tensor | None = None
    router_features: torch.Tensor | None = None


class StaticMixtureRouter(nn.Module):
    """One learned weight vector shared by every prompt (the StaticMixture baseline)."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_heads))

    def forward(self, router_features: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(router_features.shape[0], -1)


def routed_reward(head_rewards: torch.Tensor, mixture_weights: torch.Tensor) -> torch.Tensor:
    """
    The routed reward sum_k w_k r_k over the last dimension (K): head rewards (..., K) weighted by mixture weights
    (..., K), or head margins into the routed margin. Every routed reward of the library (the model's `logits`, the
    RL rewards, scoring, Stage 2, reranking) is this function; a context or user personalizes it through the weights.
    """
    return (mixture_weights * head_rewards).sum(dim=-1)


def build_router(config: MiCRoConfig) -> nn.Module:
    if not config.use_router:
        return StaticMixtureRouter(config.num_heads)
    if config.router_type == "linear":
        return nn.Linear(config.hidden_size, config.num_heads)
    return nn.Sequential(
        nn.Linear(config.hidden_size, config.router_hidden_size),
        nn.GELU(),
        nn.Linear(config.router_hidden_size, config.num_heads),
    )


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row, for right or left padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).argmax(dim=1)


def first_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the first attended token of each row (non-zero only under left padding)."""
    return attention_mask.bool().int().argmax(dim=1)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, hidden) float32: the mean of `hidden` (batch, length, hidden) over the positions where `mask` is set."""
    weights = mask.to(torch.float32)
    return torch.einsum("bt,bth->bh", weights, hidden.float()) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)


def find_prompt_end(input_ids: torch.Tensor, attention_mask: torch.Tensor, marker_ids: list[int] | None):
    """
    Index of the last prompt token of each row, found as the end of the last occurrence of `marker_ids` (the
    assistant header). Rows without the marker get -1.
    """
    batch, length = input_ids.shape
    missing = torch.full((batch,), -1, dtype=torch.long, device=input_ids.device)
    if not marker_ids or len(marker_ids) > length:
        return missing
    marker = torch.tensor(marker_ids, device=input_ids.device)
    windows = input_ids.unfold(1, len(marker_ids), 1)  # (batch, length - m + 1, m)
    hits = (windows == marker).all(dim=-1) & attention_mask[:, len(marker_ids) - 1 :].bool()
    positions = torch.arange(hits.shape[1], device=input_ids.device) + len(marker_ids) - 1
    last_hit = torch.where(hits, positions, missing[:, None]).amax(dim=1)
    return last_hit


def complete_sequence_endings(input_ids: torch.Tensor, attention_mask: torch.Tensor, end_ids: list[int]):
    """
    The rows again, padding removed and right-padded, each ending with `end_ids`: a row that ends with the first j ids
    of `end_ids` gets the other ones appended (all of them when it ends with none). Returns (input_ids, attention_mask).
    """
    rows = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        tokens = [token for token, keep in zip(ids, mask) if keep]
        overlap = next(j for j in range(len(end_ids), -1, -1) if j == 0 or tokens[-j:] == end_ids[:j])
        rows.append(tokens + end_ids[overlap:])
    length = max(len(row) for row in rows)
    completed_ids = torch.zeros((len(rows), length), dtype=input_ids.dtype, device=input_ids.device)
    completed_mask = torch.zeros((len(rows), length), dtype=attention_mask.dtype, device=attention_mask.device)
    for index, row in enumerate(rows):
        completed_ids[index, : len(row)] = torch.tensor(row, dtype=input_ids.dtype)
        completed_mask[index, : len(row)] = 1
    return completed_ids, completed_mask


FLOAT32_MODULES = ("heads", "router")
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def keeping_float32(fn):
    """`fn` (a tensor conversion of `Module._apply`) made to move floating tensors without lowering their precision."""

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            target = fn(tensor.new_empty(0))  # where and to what `fn` would take this tensor
            if target.dtype in LOW_PRECISION_DTYPES:
                return tensor.to(device=target.device)
        return fn(tensor)

    return convert


class MiCRoPreTrainedModel(PreTrainedModel):
    config_class = MiCRoConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = list(FLOAT32_MODULES)

    def _apply(self, fn, recurse=True):
        """
        `Module._apply`, behind `.to()`, `.half()`, `.bfloat16()`, `.cuda()`: heads and router are never cast to float16
        or bfloat16 (transformers applies `_keep_in_fp32_modules_strict` only when loading, in `from_pretrained`), so
        `model.to(torch.bfloat16)` gives a bfloat16 backbone and float32 heads and router, as
        `from_pretrained(dtype=torch.bfloat16)` does. Device moves apply to every module.
        """
        if recurse:
            for name, module in self.named_children():
                module._apply(keeping_float32(fn) if name in FLOAT32_MODULES else fn)
        return super()._apply(fn, recurse=False)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, StaticMixtureRouter):
            nn.init.zeros_(module.logits)


ADAPTER_CONFIG_NAME = "adapter_config.json"
MODEL_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Loading arguments that name the folder being loaded (or transformers' own adapter loading), not the base model.
RUN_FOLDER_KWARGS = ("config", "adapter_kwargs", "revision", "subfolder", "_from_auto", "num_labels", "num_heads")


def is_lora_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a local LoRA run's folder: PEFT's adapter beside a MiCRo `config.json`, no model weights."""
    path = os.fspath(path)
    return (
        os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME))
        and os.path.isfile(os.path.join(path, "config.json"))
        and not any(os.path.exists(os.path.join(path, name)) for name in MODEL_WEIGHT_FILES)
    )


def import_backbone_class(config: MiCRoConfig) -> None:
    """
    Import the backbone's modeling module now, before `from_pretrained` may enter DeepSpeed's `zero.Init`.

    Under ZeRO-3, `from_pretrained` builds the model inside `zero.Init`, which wraps the `__init__` of every module
    class defined while it is active and, on exit, puts back the `__init__` it saw at class creation. A class that a
    decorator gives a new `__init__` after creation (transformers' kernel-aware attention layers) would lose that
    `__init__` for good, and every later instance of it (the policy's too) fails in its forward. `__init__` below
    builds the backbone with `AutoModel.from_config`, the first import of its module for a checkpoint loaded cold;
    resolving the class here makes that import happen outside the context.
    """
    try:
        MODEL_MAPPING[type(config.text_config)]
    except KeyError:  # a backbone type transformers does not map: `from_config` resolves (or refuses) it itself
        pass


class MiCRoRewardModel(MiCRoPreTrainedModel):
    """
    Backbone + K reward heads + router. See the module docstring for the math.

    `forward` takes either token ids (one backbone pass) or precomputed `reward_features` / `router_features` (the
    frozen-backbone cache). The prompt boundary comes from `prompt_lengths` (the collator) or, when absent, from
    `config.prompt_marker_ids`; see [`MiCRoConfig`] for the fallback.

    `heads_untrained` is `True` on a model built here or by `from_backbone` until the Stage 1 trainer trains it, and
    `False` on one loaded by `from_pretrained`: only untrained heads may be replaced by the trainer's initialization
    (`MiCRoRewardConfig.head_init`).
    """

    def __init__(self, config: MiCRoConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.text_config)
        if self.backbone.config._attn_implementation is None:
            # MiCRoConfig(text_config=<a loaded backbone's config>) resets that sub-config's attention implementation
            # to None, and a backbone without one runs attention with no causal mask: give it the model's own.
            self.backbone.config._attn_implementation = self.config._attn_implementation
        self.heads = nn.Linear(config.reward_feature_size, config.num_heads, bias=False)
        self.router = build_router(config)
        self._warned_missing_marker = False
        self.heads_untrained = True
        self.post_init()

    # ----------------------------------------------------------------------------------------------------- building
    @classmethod
    def from_backbone(
        cls,
        backbone: str | PreTrainedModel,
        *,
        dtype: torch.dtype | str | None = None,
        backbone_kwargs: dict | None = None,
        **config_kwargs,
    ):
        """
        Wrap a pretrained backbone (a path, or a loaded `AutoModel`/`AutoModelFor*` model) with fresh heads and router.
        `config_kwargs` are [`MiCRoConfig`] fields (`num_heads`, `use_router`, ...); `backbone_kwargs` go to
        `AutoModel.from_pretrained` when `backbone` is a path (`attn_implementation`, `revision`, `device_map`,
        `quantization_config`, ...). The backbone keeps its attention implementation. The fresh weights come from
        torch's global RNG: call `transformers.set_seed` first for a reproducible start (`build_micro_model` does).
        """
        if isinstance(backbone, (str, os.PathLike)):
            check_model_path(backbone, "backbone")
            backbone = AutoModel.from_pretrained(backbone, dtype=dtype or torch.float32, **(backbone_kwargs or {}))
        backbone = getattr(backbone, "base_model", backbone)  # a *ForCausalLM / *ForSequenceClassification
        attn_implementation = backbone.config._attn_implementation
        if attn_implementation is not None and "attn_implementation" not in config_kwargs:
            config_kwargs["attn_implementation"] = attn_implementation  # or MiCRoConfig would reset it to its default
        config = MiCRoConfig(text_config=backbone.config, **config_kwargs)
        config._name_or_path = backbone.config._name_or_path
        return cls(config, backbone=backbone)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """
        `PreTrainedModel.from_pretrained`, checking first that the checkpoint is a MiCRo model of the asked shape. A
        LoRA run's folder (`is_lora_run`) loads as its base model with the adapter merged (module docstring).
        """
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            import_backbone_class(check_checkpoint_matches(str(pretrained_model_name_or_path), kwargs))
            if is_lora_run(pretrained_model_name_or_path):
                return cls._from_lora_run(os.fspath(pretrained_model_name_or_path), **kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).heads_untrained = False  # tuple: output_loading_info
        return loaded

    @classmethod
    def _from_lora_run(cls, path: str, **kwargs):
        """
        The model of a LoRA run's folder: its base (the adapter's `base_model_name_or_path`, a MiCRo checkpoint or a
        backbone wrapped with this folder's config) with the adapter applied and merged. `kwargs` (`dtype`,
        `device_map`, `attn_implementation`, ...) load the base.
        """
        from peft import PeftModel  # a LoRA run needs peft; full checkpoints load without it

        with open(os.path.join(path, ADAPTER_CONFIG_NAME), encoding="utf-8") as file:
            base = json.load(file).get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"The LoRA adapter in {path} names no base model (`base_model_name_or_path` is empty: it was trained "
                "on a model that was never saved). Load that model yourself and apply the adapter: "
                f"`PeftModel.from_pretrained(model, {path!r}).merge_and_unload()`."
            )
        config = kwargs.get("config")
        config = config if isinstance(config, MiCRoConfig) else MiCRoConfig.from_pretrained(path)
        load_kwargs = {key: value for key, value in kwargs.items() if key not in RUN_FOLDER_KWARGS}
        load_kwargs.pop("output_loading_info", None)
        if os.path.abspath(os.fspath(base)) == os.path.abspath(path):
            raise ValueError(f"The LoRA adapter in {path} names its own folder as its base model.")
        if checkpoint_model_type(base, "the adapter's base_model_name_or_path") == MiCRoConfig.model_type:
            model = cls.from_pretrained(base, **load_kwargs)
            for name in ("prompt_marker", "prompt_marker_ids", "completion_end_ids", "context_template"):
                setattr(model.config, name, getattr(config, name))  # what the run set (architecture cannot change)
        else:
            dtype = load_kwargs.pop("dtype", load_kwargs.pop("torch_dtype", None)) or torch.float32
            backbone = AutoModel.from_pretrained(base, dtype=dtype, **load_kwargs)
            config._attn_implementation = backbone.config._attn_implementation
            model = cls(config, backbone=backbone)
        vocab_size = getattr(config.text_config, "vocab_size", None)
        if vocab_size and model.get_input_embeddings().weight.shape[0] < vocab_size:
            model.resize_token_embeddings(vocab_size)  # the run added tokens (a cloned chat template)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
        model.heads_untrained = False
        return model.eval()

    def save_config_and_code(self, save_directory: str | os.PathLike) -> None:
        """
        What `save_pretrained` writes besides the weights (`config.json`, this file and `configuration_micro.py`, their
        `auto_map`): the trainer writes them beside a LoRA adapter, so the run's folder loads like a checkpoint.
        """
        os.makedirs(save_directory, exist_ok=True)
        self._add_auto_model_entry()
        custom_object_save(self, save_directory, config=self.config)
        self.config.save_pretrained(save_directory)

    def _add_auto_model_entry(self) -> None:
        module = type(self).__module__.rsplit(".", 1)[-1]
        auto_map = getattr(self.config, "auto_map", None) or {}
        self.config.auto_map = {**auto_map, "AutoModel": f"{module}.{type(self).__name__}"}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; `auto_map` also names this class for `AutoModel` (module docstring)."""
        self._add_auto_model_entry()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def freeze_backbone(self):
        self.backbone.requires_grad_(False)
        return self

    # ----------------------------------------------------------------------------------------------------- features
    def prompt_end_index(self, input_ids, attention_mask, prompt_lengths=None) -> torch.Tensor:
        """Absolute index of the last prompt token of each row."""
        last = last_token_index(attention_mask)
        if prompt_lengths is not None:
            end = first_token_index(attention_mask) + prompt_lengths.to(last.device).long() - 1
            return torch.minimum(end.clamp(min=0), last)
        end = find_prompt_end(input_ids, attention_mask, self.config.prompt_marker_ids)
        missing = end < 0
        if missing.any():
            if not self._warned_missing_marker:
                warnings.warn(
                    "MiCRoRewardModel: no prompt boundary for some sequences (pass `prompt_lengths`, or set "
                    "`config.prompt_marker_ids` to the ids that end every prompt). The router reads the last token "
                    "of the whole sequence for those rows.",
                    stacklevel=3,
                )
                self._warned_missing_marker = True
            end = torch.where(missing, last, end)
        return end

    def compute_readings(self, input_ids, attention_mask=None, prompt_lengths=None, **backbone_kwargs):
        """
        One backbone pass (two for a non-causal backbone) -> every reading a readout combines (module docstring), each
        float32 (batch, hidden): `last` and `mean`, the sequence's last token and its response's mean in the layer
        `config.reward_layer`; `prompt_last` and `prompt_mean`, the prompt's last token and its mean in the output.
        A row whose response has no token (its prompt boundary not found) has the mean over all of its tokens.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        attended = attention_mask.bool()
        prompt_end = self.prompt_end_index(input_ids, attention_mask, prompt_lengths)
        layer = self.config.reward_layer
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=layer is not None,
            **backbone_kwargs,
        )
        hidden = outputs.last_hidden_state if layer is None else outputs.hidden_states[layer]
        response = attended & (positions[None, :] > prompt_end[:, None])
        response = torch.where(response.any(dim=1, keepdim=True), response, attended)
        prompt_mask = attended & (positions[None, :] <= prompt_end[:, None])
        if self.config.backbone_is_causal:
            prompt_hidden = outputs.last_hidden_state
        else:
            # Every position of an encoder sees the response: read the prompt in a pass of its own.
            prompt_hidden = self.backbone(
                input_ids=input_ids, attention_mask=prompt_mask.to(attention_mask.dtype), **backbone_kwargs
            ).last_hidden_state
        return {
            "last": hidden[rows, last_token_index(attention_mask)].float(),
            "mean": masked_mean(hidden, response),
            "prompt_last": prompt_hidden[rows, prompt_end].float(),
            "prompt_mean": masked_mean(prompt_hidden, prompt_mask),
        }

    def features_from_readings(self, readings: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward_features, router_features) of the model's readouts, from `compute_readings`'s readings."""
        reward_features = torch.cat([readings[part] for part in self.config.reward_readout.split("_")], dim=-1)
        return reward_features, readings[f"prompt_{self.config.router_readout}"]

    def compute_features(self, input_ids, attention_mask=None, prompt_lengths=None, **backbone_kwargs):
        """
        (reward_features, router_features): h(x, y) and h(x) of the module docstring, float32, (batch,
        reward_feature_size) and (batch, hidden), from one backbone pass (`compute_readings`).
        """
        readings = self.compute_readings(input_ids, attention_mask, prompt_lengths, **backbone_kwargs)
        return self.features_from_readings(readings)

    def router_input(self, router_features: torch.Tensor) -> torch.Tensor:
        """n(h(x)) of the module docstring: what the router reads."""
        if not self.config.router_input_norm:
            return router_features
        return nn.functional.layer_norm(router_features, router_features.shape[-1:], eps=1e-5)

    def score_features(self, reward_features, router_features, mixture_weights=None) -> MiCRoRewardOutput:
        """Heads and router on backbone features; `mixture_weights` (batch, K) overrides the router's weights."""
        head_dtype = self.heads.weight.dtype
        head_rewards = self.heads(reward_features.to(head_dtype))
        router_logits = self.router(self.router_input(router_features.to(head_dtype)))
        if mixture_weights is None:
            mixture_weights = torch.softmax(router_logits, dim=-1)
        else:
            mixture_weights = self._check_mixture_weights(mixture_weights, head_rewards)
        logits = routed_reward(head_rewards, mixture_weights).unsqueeze(-1)
        return MiCRoRewardOutput(
            logits=logits,
            head_rewards=head_rewards,
            router_logits=router_logits,
            mixture_weights=mixture_weights,
            reward_features=reward_features,
            router_features=router_features,
        )

    def _check_mixture_weights(self, mixture_weights, head_rewards):
        mixture_weights = torch.as_tensor(mixture_weights, dtype=head_rewards.dtype, device=head_rewards.device)
        if mixture_weights.dim() == 1:
            mixture_weights = mixture_weights.expand_as(head_rewards)
        if mixture_weights.shape != head_rewards.shape:
            raise ValueError(
                f"`mixture_weights` must have shape (batch, num_heads) = {tuple(head_rewards.shape)}, "
                f"got {tuple(mixture_weights.shape)}."
            )
        return mixture_weights

    # ------------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prompt_lengths: torch.LongTensor | None = None,
        reward_features: torch.Tensor | None = None,
        router_features: torch.Tensor | None = None,
        mixture_weights: torch.Tensor | None = None,
        **kwargs,
    ) -> MiCRoRewardOutput:
        """
        Args:
            input_ids, attention_mask: the full sequences (prompt + response), right- or left-padded.
            prompt_lengths (`(batch,)`, *optional*): number of prompt tokens in each sequence. Without it, the prompt
                ends at `config.prompt_marker_ids` and, when `config.completion_end_ids` is set, every sequence is
                first completed with the ending training gave it and right-aligned (`position_ids` and
                `token_type_ids` are then dropped: they would describe the old layout).
            reward_features, router_features (`(batch, hidden)`, *optional*): precomputed features instead of ids.
            mixture_weights (`(batch, K)` or `(K,)`, *optional*): weights to route with instead of the router's,
                e.g. an online user's weights.
        """
        for unsupported in ("labels", "inputs_embeds"):
            if kwargs.pop(unsupported, None) is not None:
                raise ValueError(f"MiCRoRewardModel.forward does not take `{unsupported}`.")
        for ignored in ("output_attentions", "output_hidden_states", "use_cache", "return_dict"):
            kwargs.pop(ignored, None)
        if reward_features is None:
            if input_ids is None:
                raise ValueError("MiCRoRewardModel.forward needs `input_ids` or `reward_features`/`router_features`.")
            if prompt_lengths is None and self.config.completion_end_ids:
                if attention_mask is None:
                    attention_mask = torch.ones_like(input_ids)
                input_ids, attention_mask = complete_sequence_endings(
                    input_ids, attention_mask, self.config.completion_end_ids
                )
                kwargs.pop("position_ids", None)
                kwargs.pop("token_type_ids", None)
            reward_features, router_features = self.compute_features(
                input_ids, attention_mask, prompt_lengths, **kwargs
            )
        elif router_features is None:
            raise ValueError("`reward_features` was given without `router_features`.")
        return self.score_features(reward_features, router_features, mixture_weights)


MiCRoRewardModel.register_for_auto_class("AutoModelForSequenceClassification")  # saves copy this file and name it
