"""Configuration of Stage 2 router adaptation (backbone and heads frozen, the router learns to read contexts)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import ClassVar

from .base_config import MiCRoBaseConfig

ADAPTATION_LIKELIHOODS = ("pair", "context")
# Stage 1's own fields: a checkpoint keeps its architecture, and Stage 2 fixes how it trains (`RouterAdaptationConfig`).
STAGE1_FIELDS = (
    "num_heads",
    "use_router",
    "router_type",
    "router_hidden_size",
    "router_input_norm",
    "reward_readout",
    "reward_layer",
    "router_readout",
    "loss_type",
    "latent_groups",
    "user_column",
    "head_init",
    "head_init_restarts",
    "head_init_l2",
    "head_init_holdout",
    "freeze_backbone",
)


@dataclass
class RouterAdaptationConfig(MiCRoBaseConfig):
    r"""
    Stage 2: [`MiCRoBaseConfig`] (TRL's [`RewardConfig`] plus what both stages share) and the fields of fitting the
    router of a Stage 1 checkpoint on a few context-labelled pairs.

    Only the router trains; the backbone and the K heads stay as Stage 1 left them, so the objective is the mixture
    BT loss with fixed heads (see `trl_micro.trainer.adaptation_trainer`). The defaults suit a few dozen to a few
    hundred pairs: many epochs over the cached backbone features, a higher learning rate than Stage 1, no head-usage
    balance penalty (a context is supposed to pick its heads), and a pull toward the Stage 1 router.

    The router's logits move by about `learning_rate * sum_i |n_i|` per step (n: the router's input, see
    `MiCRoConfig.router_input_norm`), which grows with the hidden size: lower the learning rate for wide backbones, or
    if `router_entropy` falls to 0 early on. `router_anchor_coef` keeps few-pair adaptations from drifting along
    directions the pairs do not pin down; too large a value holds the router back. How the defaults compare on the
    project's data is in README.md and BENCHMARKS.md.

    Stage 1's fields are not settings here (passing one is an error naming the Stage 1 config): the checkpoint keeps
    its architecture, and Stage 2 always trains the router alone (a frozen backbone) on the mixture loss with a latent
    head per pair or per context (`adaptation_likelihood`).

    Fields of its own:
        router_anchor_coef: weight of the L2 pull `||theta - theta_stage1||^2` of the router's parameters toward their
            Stage 1 values; it keeps 8-pair adaptations from drifting far on directions the few pairs do not pin
            down. 0 switches it off. (`weight_decay` pulls toward zero instead, i.e. toward uniform routing.)
        adaptation_likelihood: `"pair"` (default) fits the per-pair mixture likelihood `mixture_bt_loss`, a latent
            head for every pair; `"context"` fits `context_mixture_bt_loss`, one latent head for all the pairs of a
            context (rows with the same context text) within a batch, so the router cannot fit the few pairs by
            sending each one to whichever head agrees with its label. With `"context"`, give each batch several
            pairs of every context (for a few-shot set, one batch holding all of it) and consider
            `router_anchor_coef=0`.
        max_context_length: most tokens a context may have (its text alone, before the template joins it to the
            prompt). Longer contexts raise an error naming the row: shorten them (summarize the user or the
            criterion) or raise the limit. `None` disables the check.
    """

    learning_rate: float = field(default=1e-2, metadata={"help": "AdamW learning rate of the router."})
    num_train_epochs: float = field(default=30.0, metadata={"help": "Epochs over the (small) adaptation set."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps (adaptation runs are short)."})
    save_strategy: str = field(
        default="no", metadata={"help": "Checkpoints during training; the script saves at the end."}
    )
    router_balance_coef: float = field(default=0.0, metadata={"help": "Head-usage balance penalty (off in Stage 2)."})
    router_anchor_coef: float = field(
        default=1e-2, metadata={"help": "L2 pull of the router's parameters toward their Stage 1 values."}
    )
    adaptation_likelihood: str = field(
        default="pair",
        metadata={"help": "'pair': a latent head per pair; 'context': one per context (rows sharing a context text)."},
    )
    max_context_length: int | None = field(
        default=256, metadata={"help": "Most tokens a context may have; longer ones are an error. None: no limit."}
    )

    # How Stage 2 trains, read by the trainer it shares with Stage 1; fixed, not fields.
    loss_type: ClassVar[str] = "mixture"
    latent_groups: ClassVar[str] = "pair"
    freeze_backbone: ClassVar[bool] = True
    head_init: ClassVar[str] = "random"

    def __post_init__(self):
        self.turn_off_activation_checkpointing()  # the backbone is frozen
        super().__post_init__()
        if self.router_anchor_coef < 0:
            raise ValueError(f"`router_anchor_coef` must be >= 0, got {self.router_anchor_coef}.")
        if self.adaptation_likelihood not in ADAPTATION_LIKELIHOODS:
            raise ValueError(
                f"`adaptation_likelihood` must be one of {ADAPTATION_LIKELIHOODS}, got {self.adaptation_likelihood!r}."
            )
        if self.max_context_length is not None and self.max_context_length < 1:
            raise ValueError(f"`max_context_length` must be >= 1 or None, got {self.max_context_length}.")


def _refusing_stage1_fields(init):
    """The dataclass `__init__`, after an error that names any Stage 1 field passed and where it belongs."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        stage1 = [name for name in STAGE1_FIELDS if name in kwargs]
        if stage1:
            raise TypeError(
                f"RouterAdaptationConfig has no field {', '.join(map(repr, stage1))}: a Stage 1 checkpoint keeps its "
                "architecture, and router adaptation trains the router alone, on the mixture loss, with a frozen "
                "backbone. Remove it; to train heads or the backbone, use MiCRoRewardConfig and MiCRoRewardTrainer "
                "(Stage 1)."
            )
        init(self, *args, **kwargs)

    return __init__


RouterAdaptationConfig.__init__ = _refusing_stage1_fields(RouterAdaptationConfig.__init__)
