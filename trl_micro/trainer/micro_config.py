"""Configuration of the Stage 1 trainer (mixture of Bradley-Terry heads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..configuration_micro import MiCRoArchitecture
from ..value_checks import is_integer
from .base_config import MiCRoBaseConfig


@dataclass
class MiCRoRewardConfig(MiCRoBaseConfig, MiCRoArchitecture):
    r"""
    Stage 1: [`MiCRoBaseConfig`] (TRL's [`RewardConfig`] plus what both stages share) and the fields of a mixture of
    heads trained from a backbone. Everything else (learning rate, batch sizes, `max_length`, logging, `report_to`,
    saving) behaves as in TRL's reward trainer.

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
        freeze_backbone: train heads and router only.
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
    freeze_backbone: bool = field(default=False, metadata={"help": "Train heads and router only."})

    def __post_init__(self):
        if self.freeze_backbone:
            self.turn_off_activation_checkpointing()
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
