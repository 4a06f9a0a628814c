"""Configuration of the Stage 1 trainer (mixture of Bradley-Terry heads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from accelerate.utils import is_deepspeed_available
from trl import RewardConfig

from ..configuration_micro import MiCRoArchitecture
from ..value_checks import is_integer

DEEPSPEED_EXTRA = "pip install 'trl-micro[deepspeed]'"


def require_deepspeed(what: str) -> None:
    """Refuse a DeepSpeed setting early, naming the extra that installs it (DeepSpeed is optional, as in TRL)."""
    if not is_deepspeed_available():
        raise ImportError(f"{what} needs DeepSpeed, which is not installed here: {DEEPSPEED_EXTRA}.")


@dataclass
class MiCRoRewardConfig(RewardConfig, MiCRoArchitecture):
    r"""
    [`RewardConfig`] plus the MiCRo fields. Everything else (learning rate, batch sizes, `max_length`, logging,
    `report_to`, saving) behaves as in TRL's reward trainer.

    Model fields, those of [`MiCRoArchitecture`] (used when the trainer builds the model from a backbone path; a MiCRo
    checkpoint keeps its own): num_heads, use_router, router_type, router_hidden_size, router_input_norm.

    Training fields:
        loss_type: `"mixture"` (MiCRo's mixture BT loss) or `"ensemble"` (each head its own BT loss: Shared-Base
            Ensemble).
        latent_groups: which pairs share one latent head in the mixture loss. `"prompt_chosen"` (default): pairs with
            the same prompt (context included) and the same chosen response, one rater's comparisons of that response
            with several others, as multi-response ratings are binarized; they are batched together and fitted with
            `trl_micro.losses.context_mixture_bt_loss`. A dataset of one pair per prompt has one pair per group, and
            the loss is then the per-pair mixture loss. `"pair"`: every pair its own latent head (the MiCRo paper's
            Stage 1 objective). On data where raters reverse each other's pairs, per-pair latents settle on heads that
            split each pair between the two labels instead of heads that each follow one rater. `"user"`: all pairs
            with the same id in `user_column` share one latent head (one user's comparisons, whatever their prompts),
            in the loss, the batches and the EM start; pairs without an id (`None` or empty) fall back to
            `"prompt_chosen"`. Use it when the data names its raters.
        user_column: the column of user ids that `latent_groups="user"` groups by (text or integer ids).
        head_init: `"em"` (default) or `"random"`. With `"em"`, fresh heads (a model built from a backbone, not a
            loaded checkpoint) trained on cached features (`freeze_backbone`) with the mixture loss start from the best
            of `head_init_restarts` expectation-maximization fits of the mixture on the training features
            (`trl_micro.trainer.head_initialization`) instead of at random; training then refines them. Elsewhere
            (a trained backbone, the ensemble loss, K = 1) heads start at random either way.
        head_init_restarts: EM runs from random starts, for each L2 weight of `head_init_l2`.
        head_init_l2: L2 weights of the EM fit's heads on standardized features, per pair. Restart and weight are
            chosen by the likelihood of the latent groups held out of the fit (`head_init_holdout`), then refitted on
            every group; one value fixes the weight.
        head_init_holdout: share of the latent groups held out to choose among the EM fits (0: choose by the
            training likelihood, which favors the fit that overfits most when pairs are fewer than feature
            dimensions).
        router_balance_coef, router_entropy_coef: weights of the regularizers against router collapse
            (see `trl_micro.losses`); 0 switches one off.
        freeze_backbone: train heads and router only.
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

    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (heads and router learn fast)."})
    loss_type: Literal["mixture", "ensemble"] = field(
        default="mixture", metadata={"help": "'mixture' (MiCRo) or 'ensemble' (independent heads)."}
    )
    latent_groups: Literal["prompt_chosen", "pair", "user"] = field(
        default="prompt_chosen",
        metadata={
            "help": "'prompt_chosen': pairs sharing a prompt and a chosen response share a latent head; 'pair'; "
            "'user': all pairs of one user (`user_column`) share one, pairs without an id fall back to prompt_chosen."
        },
    )
    user_column: str = field(
        default="user_id", metadata={"help": "Column of user ids that latent_groups='user' groups pairs by."}
    )
    head_init: Literal["em", "random"] = field(
        default="em", metadata={"help": "'em': fresh heads on cached features start from an EM fit; 'random'."}
    )
    head_init_restarts: int = field(default=8, metadata={"help": "EM runs of head_init='em' per L2 weight."})
    head_init_l2: list[float] = field(
        default_factory=lambda: [0.1, 1.0, 10.0],
        metadata={"help": "L2 weights of the EM fit (standardized features); held-out likelihood chooses one."},
    )
    head_init_holdout: float = field(
        default=0.2, metadata={"help": "Share of latent groups held out to choose the EM fit (0: training likelihood)."}
    )
    router_balance_coef: float = field(default=0.1, metadata={"help": "Weight of the head-usage balance penalty."})
    router_entropy_coef: float = field(default=0.0, metadata={"help": "Weight of the per-prompt entropy penalty."})
    freeze_backbone: bool = field(default=False, metadata={"help": "Train heads and router only."})
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

    def __post_init__(self):
        if self.deepspeed:
            require_deepspeed(f"`deepspeed` ({self.deepspeed!r})")
        if self.bf16 is None and not self.fp16:
            # TRL turns bf16 on by default, which fails on machines without bf16 support (a CPU without `use_cpu`).
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if self.freeze_backbone:
            self.gradient_checkpointing = False  # nothing to recompute: no gradient flows into the backbone
        super().__post_init__()
        self.check_architecture()
        if self.loss_type not in ("mixture", "ensemble"):
            raise ValueError(f"`loss_type` must be 'mixture' or 'ensemble', got {self.loss_type!r}.")
        if self.latent_groups not in ("prompt_chosen", "pair", "user"):
            raise ValueError(f"`latent_groups` must be 'prompt_chosen', 'pair' or 'user', got {self.latent_groups!r}.")
        if self.latent_groups == "user" and (not isinstance(self.user_column, str) or not self.user_column):
            raise ValueError(
                f"`user_column` must name the column of user ids that latent_groups='user' groups by, got "
                f"{self.user_column!r}."
            )
        if self.head_init not in ("em", "random"):
            raise ValueError(f"`head_init` must be 'em' or 'random', got {self.head_init!r}.")
        if not is_integer(self.head_init_restarts) or self.head_init_restarts < 1:
            raise ValueError(f"`head_init_restarts` must be an integer >= 1, got {self.head_init_restarts!r}.")
        if isinstance(self.head_init_l2, (int, float)):
            self.head_init_l2 = [float(self.head_init_l2)]
        if not self.head_init_l2 or not all(
            isinstance(value, (int, float)) and value > 0 for value in self.head_init_l2
        ):
            raise ValueError(f"`head_init_l2` must be weights > 0 (one or more), got {self.head_init_l2!r}.")
        if not 0 <= self.head_init_holdout < 1:
            raise ValueError(f"`head_init_holdout` must be in [0, 1), got {self.head_init_holdout!r}.")
        if not is_integer(self.model_card_pairs) or self.model_card_pairs < 0:
            raise ValueError(f"`model_card_pairs` must be an integer >= 0, got {self.model_card_pairs!r}.")
        for name in ("router_balance_coef", "router_entropy_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
