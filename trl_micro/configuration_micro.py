"""
Configuration of a MiCRo reward model (a backbone, K reward heads and a router), and the checks that a path holds the
checkpoint asked for.

This file and `modeling_micro.py` are the model's code as a checkpoint carries it: every save copies both beside the
weights and writes their `auto_map` into `config.json` (transformers' custom-code mechanism), so a process that never
imports trl_micro loads the checkpoint with `trust_remote_code=True`. They import nothing from trl_micro but each
other, by relative imports only.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

ROUTER_TYPES = ("linear", "mlp")
REWARD_READOUTS = ("last", "mean", "last_mean")
ROUTER_READOUTS = ("last", "mean")
# How checkpoints saved before the readouts existed read a sequence: the last token, of the output, for both.
LEGACY_READOUT = {"reward_readout": "last", "reward_layer": None, "router_readout": "last"}


@dataclass(kw_only=True)  # keyword-only: the trainers' configs keep TrainingArguments' positional `output_dir`
class MiCRoArchitecture:
    r"""
    The fields that shape a MiCRo model beyond its backbone, declared once: [`MiCRoConfig`] stores them in a
    checkpoint, and the trainers' configs take them as arguments (`--num_heads`, ...) to build a model from a backbone.

    Args:
        num_heads (`int`, defaults to 4):
            K, the number of Bradley-Terry reward heads. `num_heads=1` is a plain BT reward model (SingleReward).
        use_router (`bool`, defaults to `True`):
            Route with a router that reads the prompt. `False` learns one global weight vector over the heads
            (StaticMixture).
        router_type (`"linear"` or `"mlp"`, defaults to `"linear"`):
            Linear router `softmax(W h + b)` or a one-hidden-layer MLP.
        router_hidden_size (`int`, defaults to 256):
            Hidden width of the MLP router.
        router_input_norm (`bool`, defaults to `True`):
            Standardize the prompt feature before the router (n in `trl_micro.modeling_micro`; no learned weights).
            Raw decoder hidden states are large and dominated by a few dimensions, so an unnormalized router
            saturates within a few steps, before the heads have specialized, and leaves heads unused.
        reward_readout (`"last"`, `"mean"` or `"last_mean"`, defaults to `"last_mean"`):
            How the heads read a sequence (h(x, y) in `trl_micro.modeling_micro`): the hidden state of its last token,
            the mean over the response's tokens, or both concatenated (features of twice the hidden size). A
            decoder's last token is trained to predict the next token; the mean sees every position of the answer
            (its style and content), the last token what the whole sequence adds up to (its length among them).
        reward_layer (`int`, *optional*):
            Which hidden layer the heads read: `None` is the backbone's output (`last_hidden_state`, after its final
            norm); an integer indexes the backbone's `hidden_states` (0 = the embeddings, negative from the end).
        router_readout (`"last"` or `"mean"`, defaults to `"last"`):
            How the router reads the prompt (h(x)): the backbone's output at the last prompt token, or its mean over
            the prompt's tokens.
    """

    num_heads: int = field(default=4, metadata={"help": "K, the number of reward heads (1 = plain BT)."})
    use_router: bool = field(default=True, metadata={"help": "False learns one global weight vector (StaticMixture)."})
    router_type: Literal["linear", "mlp"] = field(default="linear", metadata={"help": "'linear' or 'mlp'."})
    router_hidden_size: int = field(default=256, metadata={"help": "Hidden width of the MLP router."})
    router_input_norm: bool = field(default=True, metadata={"help": "Standardize the prompt feature the router reads."})
    reward_readout: Literal["last", "mean", "last_mean"] = field(
        default="last_mean",
        metadata={"help": "How the heads read a sequence: 'last' token, 'mean' over the response, or 'last_mean'."},
    )
    reward_layer: int | None = field(
        default=None, metadata={"help": "Hidden layer the heads read (None: the backbone's output; 0: embeddings)."}
    )
    router_readout: Literal["last", "mean"] = field(
        default="last", metadata={"help": "How the router reads the prompt: 'last' prompt token or 'mean'."}
    )

    def check_architecture(self) -> None:
        """Raise a `ValueError` naming the first invalid architecture field."""
        owner = type(self).__name__
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"{owner}.num_heads must be an integer >= 1, got {self.num_heads!r}.")
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"{owner}.router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}.")
        if (
            isinstance(self.router_hidden_size, bool)
            or not isinstance(self.router_hidden_size, int)
            or (self.router_hidden_size < 1)
        ):
            raise ValueError(f"{owner}.router_hidden_size must be an integer >= 1, got {self.router_hidden_size!r}.")
        if self.reward_readout not in REWARD_READOUTS:
            raise ValueError(f"{owner}.reward_readout must be one of {REWARD_READOUTS}, got {self.reward_readout!r}.")
        if self.router_readout not in ROUTER_READOUTS:
            raise ValueError(f"{owner}.router_readout must be one of {ROUTER_READOUTS}, got {self.router_readout!r}.")
        if self.reward_layer is not None and (
            isinstance(self.reward_layer, bool) or not isinstance(self.reward_layer, int)
        ):
            raise ValueError(
                f"{owner}.reward_layer must be an integer (an index into the backbone's hidden_states) or None (its "
                f"output), got {self.reward_layer!r}."
            )

    @property
    def readout_name(self) -> str:
        """The readout in one word, e.g. `"last_mean@output/last"` (reward readout @ layer / router readout)."""
        return f"{self.reward_readout}@{self.reward_layer_name}/{self.router_readout}"

    @property
    def reward_layer_name(self) -> str:
        """`"output"` (the backbone's output) or `"layer<n>"`."""
        return "output" if self.reward_layer is None else f"layer{self.reward_layer}"

    def architecture_kwargs(self) -> dict:
        """The architecture fields as keyword arguments of [`MiCRoConfig`] (or `MiCRoRewardModel.from_backbone`)."""
        return {f.name: getattr(self, f.name) for f in fields(MiCRoArchitecture)}


class MiCRoConfig(PreTrainedConfig, MiCRoArchitecture):
    r"""
    Configuration of [`MiCRoRewardModel`].

    The backbone's own configuration is kept as the sub-config `text_config`, so `config.get_text_config()` returns it
    (TRL writes the pad token there). `num_labels` stays 1: to TRL the model is an ordinary one-label reward model whose
    `logits` are the routed reward. The head and router fields (`num_heads`, `use_router`, `router_type`,
    `router_hidden_size`, `router_input_norm`) and the readouts (`reward_readout`, `reward_layer`, `router_readout`)
    are those of [`MiCRoArchitecture`].

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            Configuration of the backbone, anything `AutoModel.from_config` builds (Llama, Qwen2, SmolLM2, BERT, ...).
        prompt_marker_ids (`list[int]`, *optional*):
            Token ids that end every prompt (a chat template's assistant header, or e.g. the ids of `"\n\nAssistant:"`
            for HH-style transcripts). Used to find the prompt boundary when only full texts are given (inference,
            PPO). The trainers fill it in from the tokenizer. Fallback when it is unset or absent from a sequence: the
            whole sequence is read as the prompt (the router reads its last token or mean) and as the response (a mean
            readout averages all of its tokens).
        prompt_marker (`str`, *optional*):
            The text of `prompt_marker_ids`, kept for readability.
        completion_end_ids (`list[int]`, *optional*):
            Token ids that follow the completion's text in every training sequence: the EOS for standard text, the
            chat template's end of turn (e.g. the ids of `"<|im_end|>\n"`) for conversations. The trainers fill it in.
            When set, sequences scored without `prompt_lengths` (full texts from TRL's GRPO/RLOO by-path reward models,
            PPO rollouts that stop at the EOS) are completed with the missing part of this ending and right-aligned
            before the backbone runs, so they are scored at the token training scored.
        context_template (`str`, defaults to `"{context}\n\n"`):
            How a context (user description, criterion, persona) joins a prompt. Standard text: the formatted template
            is put before the prompt. Conversational: it becomes the system message (stripped).
        backbone_is_causal (`bool`, *optional*):
            Whether a token's hidden state depends only on the tokens before it. Decoders (`True`) let the router read
            the last prompt token from the same forward pass that gives the rewards; encoders such as BERT (`False`)
            need one extra prompt-only pass. Detected from the backbone's type when unset.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the heads' and router's initial weights.
    """

    model_type = "micro"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    prompt_marker_ids: list[int] | None = None
    prompt_marker: str | None = None
    completion_end_ids: list[int] | None = None
    context_template: str = "{context}\n\n"
    backbone_is_causal: bool | None = None
    initializer_range: float = 0.02

    # Callables run once, when the first config is built: `import trl_micro` registers the model classes with
    # transformers' Auto classes there (every Auto load builds its config first), so importing the package does not
    # load the modeling stack. Empty in a checkpoint's copy of this file.
    on_first_build: ClassVar[list] = []

    def __post_init__(self, **kwargs):
        while MiCRoConfig.on_first_build:
            MiCRoConfig.on_first_build.pop()()
        kwargs["num_labels"] = 1
        super().__post_init__(**kwargs)
        if self.num_labels != 1:
            raise ValueError("MiCRoConfig.num_labels must be 1: the routed reward is a single score.")
        self.check_architecture()
        if "{context}" not in self.context_template:
            raise ValueError(f"MiCRoConfig.context_template must contain '{{context}}', got {self.context_template!r}.")
        if self.backbone_is_causal is None:
            self.backbone_is_causal = is_causal_backbone(self.text_config)
        num_layers = getattr(self.text_config, "num_hidden_layers", None)
        if (
            self.reward_layer is not None
            and num_layers is not None
            and not -num_layers - 1 <= self.reward_layer <= num_layers
        ):
            raise ValueError(
                f"MiCRoConfig.reward_layer={self.reward_layer} is out of range: the backbone has {num_layers} layers, "
                f"so hidden_states holds {num_layers + 1} (indices {-num_layers - 1} to {num_layers}). Use None for "
                "the backbone's output."
            )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """`PreTrainedConfig.from_dict`; a config saved before readouts were settings read its sequences as
        `LEGACY_READOUT` says, whatever today's defaults."""
        if config_dict.get("model_type") == cls.model_type and "reward_readout" not in config_dict:
            config_dict = {**LEGACY_READOUT, **config_dict}
        return super().from_dict(config_dict, **kwargs)

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def reward_feature_size(self) -> int:
        """Size of h(x, y), what each head reads: twice the hidden size for `reward_readout="last_mean"`."""
        return self.hidden_size * (2 if self.reward_readout == "last_mean" else 1)


def is_causal_backbone(config: PreTrainedConfig) -> bool:
    """Decoder-only families are causal; families that also have a masked-LM head (BERT, RoBERTa, ...) are not."""
    model_type = config.model_type
    if getattr(config, "is_decoder", False):
        return True
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


# ------------------------------------------------------------------------------------------------ checkpoint paths
def check_model_path(path: str | os.PathLike, field: str = "model") -> None:
    """A `ValueError` naming `field` for a model path that is neither a local directory nor a Hub repo id."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ValueError(
            f"`{field}`: there is no model directory at {path!r} (and it is not a Hub repo id, 'org/name'). Check the "
            "path: it must be a folder with a config.json, as written by save_pretrained."
        ) from None


def checkpoint_config_dict(path: str | os.PathLike, field: str = "model") -> dict:
    """The config.json of the checkpoint at `path`, as a dict (no config object is built)."""
    check_model_path(path, field)
    config_dict, _ = PreTrainedConfig.get_config_dict(os.fspath(path))
    return config_dict


def checkpoint_model_type(path: str | os.PathLike, field: str = "model") -> str | None:
    """The `model_type` of the checkpoint at `path`, read from its config.json without building a config object."""
    return checkpoint_config_dict(path, field).get("model_type")


def check_checkpoint_matches(path: str, load_kwargs: dict) -> MiCRoConfig:
    """
    Clear errors for a checkpoint that is not a MiCRo model, or whose K or backbone differ from what is asked; a
    warning for one saved without its modeling code (which only trl_micro can load). Returns the saved config.
    """
    saved = checkpoint_config_dict(path)
    if saved.get("model_type") != MiCRoConfig.model_type:
        raise ValueError(
            f"{path} is not a MiCRo checkpoint (model_type={saved.get('model_type')!r}). To start from this backbone, "
            f"use MiCRoRewardModel.from_backbone({path!r}, num_heads=...). (A LoRA run that MiCRoRewardTrainer trained "
            "from this backbone loads from the run's own folder: MiCRoRewardModel.from_pretrained(run_folder).)"
        )
    if "AutoModelForSequenceClassification" not in (saved.get("auto_map") or {}):
        warnings.warn(
            f"{path} was saved without its modeling code (no `auto_map` in its config.json, as older trl-micro "
            "versions saved). trl_micro loads it, but TRL's own scripts (`trl grpo --reward_model_name_or_path`) and "
            "other tools that load a reward model by path cannot. Save it again to add the code: "
            f"`MiCRoRewardModel.from_pretrained({path!r}).save_pretrained(new_path)` (and its tokenizer), then pass "
            "new_path with `--trust_remote_code`.",
            stacklevel=3,
        )
    saved = MiCRoConfig.from_pretrained(path)
    asked = load_kwargs.get("config")
    asked_heads = load_kwargs.get("num_heads", getattr(asked, "num_heads", saved.num_heads))
    if asked_heads != saved.num_heads:
        raise ValueError(
            f"The checkpoint at {path} has num_heads={saved.num_heads}, but num_heads={asked_heads} was asked."
        )
    if isinstance(asked, MiCRoConfig):
        for field in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            mine, theirs = getattr(asked.text_config, field, None), getattr(saved.text_config, field, None)
            if mine != theirs:
                raise ValueError(
                    f"The checkpoint at {path} has a backbone with text_config.{field}={theirs!r}, but the config "
                    f"passed asks for {mine!r}."
                )
    return saved


MiCRoConfig.register_for_auto_class()  # saved configs name this file in `auto_map["AutoConfig"]`
