"""
What both training stages share: TRL's [`RewardConfig`] plus the fields of the feature store, the prompt and context
columns, the router's regularizers and the model card. Stage 1 is [`MiCRoRewardConfig`]
(`trl_micro.trainer.micro_config`), Stage 2 [`RouterAdaptationConfig`] (`trl_micro.trainer.adaptation_config`); each
holds only its own fields on top of this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate.utils import is_deepspeed_available
from trl import RewardConfig

from ..value_checks import is_integer

DEEPSPEED_EXTRA = "pip install 'trl-micro[deepspeed]'"


def require_deepspeed(what: str) -> None:
    """Refuse a DeepSpeed setting early, naming the extra that installs it (DeepSpeed is optional, as in TRL)."""
    if not is_deepspeed_available():
        raise ImportError(f"{what} needs DeepSpeed, which is not installed here: {DEEPSPEED_EXTRA}.")


@dataclass
class MiCRoBaseConfig(RewardConfig):
    r"""
    [`RewardConfig`] plus the fields both MiCRo stages use. Everything else behaves as in TRL's reward trainer.

    Fields:
        router_balance_coef, router_entropy_coef: weights of the regularizers against router collapse
            (see `trl_micro.losses`); 0 switches one off.
        use_feature_cache: with a frozen backbone (and no PEFT adapter, no ZeRO-3, no streaming `IterableDataset`),
            compute the backbone features of each distinct sequence once, keep them in the feature store on disk
            (`trl_micro.feature_cache`, shared with other datasets and runs on the same backbone) and train on them.
        bf16: as in TRL, except that unset means "where the hardware supports it" instead of always.
        feature_cache_dir: root of the feature store (default `$TRL_MICRO_CACHE/features`, with `TRL_MICRO_CACHE`
            defaulting to `~/.cache/trl_micro`).
        context_column: dataset column whose text (a user, a criterion, a persona) joins each prompt through the
            model's `context_template`; ignored when absent from the dataset.
        prompt_marker: text that ends every prompt in standard (non-chat) data, e.g. `"\n\nAssistant:"`. It splits
            implicit prompts (and the shared ids of pre-tokenized `chosen_ids` / `rejected_ids` pairs) and lets the
            saved model find the prompt boundary in full texts. For conversational data the chat template's assistant
            header is used.
        model_card_pairs: pairs (a seeded sample of the evaluation set when there is one, else of the training set)
            scored at every save to measure each head for the model card (`trl_micro.model_card`); 0: no measuring.
    """

    router_balance_coef: float = field(default=0.1, metadata={"help": "Weight of the head-usage balance penalty."})
    router_entropy_coef: float = field(default=0.0, metadata={"help": "Weight of the per-prompt entropy penalty."})
    use_feature_cache: bool = field(
        default=True, metadata={"help": "Cache frozen-backbone features on disk and train on them."}
    )
    feature_cache_dir: str | None = field(default=None, metadata={"help": "Directory of the feature cache."})
    feature_batch_size: int = field(default=16, metadata={"help": "Batch size of the one-off feature pass."})
    context_column: str = field(default="context", metadata={"help": "Column with each example's context text."})
    prompt_marker: str | None = field(
        default=None, metadata={"help": "Text that ends every prompt in standard data, e.g. '\\n\\nAssistant:'."}
    )
    model_card_pairs: int = field(
        default=128, metadata={"help": "Pairs scored at each save to measure the heads for the model card (0: none)."}
    )

    def turn_off_activation_checkpointing(self) -> None:
        """With a frozen backbone there is nothing to recompute. Newer transformers name the field
        `activation_checkpointing` (setting the old name then warns); older ones `gradient_checkpointing`."""
        if "activation_checkpointing" in self.__dataclass_fields__:
            self.activation_checkpointing = False
        else:
            self.gradient_checkpointing = False

    def __post_init__(self):
        if self.deepspeed:
            require_deepspeed(f"`deepspeed` ({self.deepspeed!r})")
        if self.bf16 is None and not self.fp16:
            # TRL turns bf16 on by default, which fails on machines without bf16 support (a CPU without `use_cpu`).
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        super().__post_init__()
        if not is_integer(self.model_card_pairs) or self.model_card_pairs < 0:
            raise ValueError(f"`model_card_pairs` must be an integer >= 0, got {self.model_card_pairs!r}.")
        for name in ("router_balance_coef", "router_entropy_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
