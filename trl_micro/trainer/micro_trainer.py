"""Stage 1: train a MiCRo reward model (mixture of Bradley-Terry heads + router) on ordinary preference pairs."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from datasets import Dataset, IterableDataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, set_seed
from trl import RewardTrainer
from trl.data_utils import get_dataset_column_names, is_conversational

from ..configuration_micro import checkpoint_model_type
from ..data_utils import (
    PAIR_LABEL_COLUMNS,
    TOKENIZED_COLUMNS,
    GroupedBatchSampler,
    MiCRoPreferenceCollator,
    assistant_header,
    check_margins,
    check_preference_columns,
    completion_end_token_ids,
    latent_groups,
    marker_token_ids,
    tokenize_preference_example,
)
from ..feature_cache import CachedFeatureCollator, pair_features
from ..losses import (
    HEAD_AGREEMENT_WARNING,
    balance_penalty,
    context_mixture_bt_loss,
    ensemble_bt_loss,
    entropy,
    entropy_penalty,
    head_agreement,
    mixture_bt_loss,
)
from ..model_card import MiCRoModelCardMixin
from ..modeling_micro import MiCRoRewardModel
from .head_initialization import em_initial_heads
from .micro_config import MiCRoRewardConfig

logger = logging.getLogger(__name__)


def build_micro_model(model_id: str, args: MiCRoRewardConfig) -> MiCRoRewardModel:
    """
    Load a MiCRo checkpoint, or wrap a backbone checkpoint with fresh heads and router built from `args`, drawn after
    `set_seed(args.seed)` so that one seed gives one start (the Trainer seeds only after its model exists).
    """
    init_kwargs = dict(args.model_init_kwargs or {})
    dtype = init_kwargs.pop("dtype", init_kwargs.pop("torch_dtype", torch.float32))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if checkpoint_model_type(model_id) == "micro":
        return MiCRoRewardModel.from_pretrained(model_id, dtype=dtype, **init_kwargs)
    set_seed(args.seed)
    return MiCRoRewardModel.from_backbone(model_id, dtype=dtype, **args.architecture_kwargs())


class MiCRoRewardTrainer(MiCRoModelCardMixin, RewardTrainer):
    """
    [`RewardTrainer`] for MiCRo reward models (see `trl_micro.losses` for the objective).

    Takes TRL's preference formats (explicit or implicit prompt, standard or conversational) and keeps, for every
    sequence, where its prompt ends, so each pair is routed by its own prompt. An optional context column joins the
    prompt. `model` is a [`MiCRoRewardModel`], a MiCRo checkpoint path, or a backbone path (wrapped with fresh heads
    and router from `args`). With `args.freeze_backbone`, backbone features are computed once and cached (not for a
    streaming `IterableDataset`: its features are computed every step, with a warning).

    Pairs whose `chosen` equals `rejected` carry no preference (their loss has no gradient): they are dropped with a
    warning that counts them, like pairs over `max_length`. An empty dataset, a value that is neither text nor a list of
    messages, and a `margin` that is not a finite number are errors naming the row and the column.

    Logged, besides TRL's reward metrics: `mixture_nll`, `head_accuracy/k`, `head_usage/k`, `router_entropy`,
    `head_agreement` (the share of pairs two heads rank alike, averaged over head pairs; a warning at the end of
    training says when it stays near 1: the heads have not separated) and the regularizers. Every save also writes the
    model card, with a card per head (`trl_micro.model_card`).
    """

    _tag_names = ["trl", "reward-trainer", "trl-micro"]
    _name = "MiCRo Reward"

    def __init__(
        self,
        model: str | MiCRoRewardModel,
        args: MiCRoRewardConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        peft_config=None,
        **kwargs,
    ):
        args = args if args is not None else MiCRoRewardConfig("micro-reward")
        if not isinstance(args, MiCRoRewardConfig):
            raise TypeError(f"`args` must be a MiCRoRewardConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        first_example = next(iter(train_dataset), None)
        if first_example is None:
            raise ValueError("The train dataset is empty: MiCRoRewardTrainer needs at least one preference pair.")
        if isinstance(model, str):
            model = build_micro_model(model, args)
        if not isinstance(model, MiCRoRewardModel):
            raise TypeError(
                f"`model` must be a MiCRoRewardModel or a path, got {type(model).__name__}. Wrap a backbone with "
                "`MiCRoRewardModel.from_backbone(...)`."
            )
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token

        self._set_prompt_marker(model, processing_class, first_example, args)
        if args.freeze_backbone:
            model.freeze_backbone()
        if peft_config is not None:
            trained_modules = ["heads", "router"]
            peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | set(trained_modules))
            peft_config.exclude_modules = sorted(set(peft_config.exclude_modules or []) | set(trained_modules))

        self._feature_bank = self._make_feature_bank(args, peft_config, train_dataset, eval_dataset)
        if data_collator is None:
            pad_to_multiple_of = args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None
            data_collator = self._feature_bank or MiCRoPreferenceCollator(
                processing_class.pad_token_id, pad_to_multiple_of=pad_to_multiple_of
            )
        self._features_model = model  # the backbone the cache is computed with, before any wrapping
        self._keep_card_pairs(train_dataset, eval_dataset)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------------ preparation
    @staticmethod
    def _set_prompt_marker(model, tokenizer, first_example, args) -> None:
        """Store in the model the marker that ends prompts and the ids that end completions, so full texts can be
        routed and scored after training as they were in training."""
        conversational = is_conversational({k: first_example[k] for k in ("chosen",) if k in first_example})
        marker = assistant_header(tokenizer) if conversational else args.prompt_marker
        if marker is not None:
            model.config.prompt_marker = marker
            model.config.prompt_marker_ids = marker_token_ids(tokenizer, marker)
        model.config.completion_end_ids = completion_end_token_ids(tokenizer, conversational)

    @staticmethod
    def _make_feature_bank(args, peft_config, train_dataset, eval_dataset) -> CachedFeatureCollator | None:
        if not (args.freeze_backbone and args.use_feature_cache):
            return None
        eval_datasets = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        if any(isinstance(dataset, IterableDataset) for dataset in (train_dataset, *eval_datasets)):
            logger.warning(
                "Feature cache off: a streaming IterableDataset cannot be cached ahead of training, so the frozen "
                "backbone runs every step. Pass a datasets.Dataset to train on cached features."
            )
            return None
        if peft_config is not None:
            logger.info("Feature cache off: a PEFT adapter trains the backbone.")
            return None
        if args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3:
            logger.info("Feature cache off: ZeRO-3 partitions the backbone; features are computed every step.")
            return None
        return CachedFeatureCollator()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if isinstance(dataset, Dataset) and "pair_index" in dataset.column_names:
            return dataset  # already turned into cached features
        column_names = get_dataset_column_names(dataset)
        if "margin" in column_names and isinstance(dataset, Dataset):
            check_margins(dataset["margin"], f"the {dataset_name} dataset")
        if not all(column in column_names for column in TOKENIZED_COLUMNS):
            check_preference_columns(column_names, dataset_name)
            dataset = self._drop_pairs(
                dataset,
                lambda example: example["chosen"] != example["rejected"],
                dataset_name,
                "identical (`chosen` == `rejected`)",
                "such a pair carries no preference; fix or drop it",
            )
            context_column = args.context_column if args.context_column in column_names else None
            map_kwargs = {"desc": f"Tokenizing {dataset_name} dataset"} if isinstance(dataset, Dataset) else {}
            if isinstance(dataset, Dataset):
                map_kwargs["num_proc"] = args.dataset_num_proc
            with args.main_process_first(desc=f"tokenizing {dataset_name}"):
                dataset = dataset.map(
                    tokenize_preference_example,
                    with_indices=True,
                    fn_kwargs={
                        "tokenizer": processing_class,
                        "context_template": self._features_model.config.context_template,
                        "context_column": context_column,
                        "prompt_marker": args.prompt_marker,
                    },
                    **map_kwargs,
                )
        dataset = self._drop_overlong(dataset, args.max_length, dataset_name)
        if self._groups_latents(args) and isinstance(dataset, Dataset) and "latent_group" not in dataset.column_names:
            dataset = dataset.add_column("latent_group", latent_groups(dataset["chosen_ids"]))
        if self._feature_bank is not None and isinstance(dataset, Dataset):
            dataset = self._cache_features(dataset, args, dataset_name)
        return dataset

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`, from heads initialized by EM where `args.head_init` asks for it (see
        `_initialize_heads`), then a warning when the heads have not separated (see `HEAD_AGREEMENT_WARNING`)."""
        if not resume_from_checkpoint:
            self._initialize_heads()
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.state.global_step > 0:
            self.accelerator.unwrap_model(self.model).heads_untrained = False
        agreements = [entry["head_agreement"] for entry in self.state.log_history if "head_agreement" in entry]
        if agreements and agreements[-1] >= HEAD_AGREEMENT_WARNING:
            logger.warning(
                f"The {self.model.config.num_heads if hasattr(self.model, 'config') else 'K'} heads rank "
                f"{agreements[-1]:.0%} of the training pairs the same way: they have not separated into distinct "
                "tastes, so routing has little to choose from. If the data mixes raters, check that `latent_groups` "
                "groups one rater's pairs, train longer or with a higher learning rate; if it does not, fewer heads "
                "(or num_heads=1) fit it as well."
            )
        return output

    def _initialize_heads(self) -> None:
        """
        With `head_init="em"`, replace untrained heads by the EM fit of the mixture on the cached training features
        (`trl_micro.trainer.head_initialization`). Only where it applies: a mixture loss with K > 1, heads not yet
        trained (`MiCRoRewardModel.heads_untrained`: a loaded checkpoint keeps its own) and features cached (a trained
        backbone changes them).
        """
        args: MiCRoRewardConfig = self.args
        model = self.accelerator.unwrap_model(self.model)
        if args.head_init != "em" or args.loss_type != "mixture" or not getattr(model, "heads_untrained", False):
            return
        if model.config.num_heads < 2:
            return
        dataset = self.train_dataset
        bank = next(
            (
                collator
                for collator in (self.data_collator, self._feature_bank)
                if isinstance(collator, CachedFeatureCollator) and collator.features is not None
            ),
            None,
        )
        if bank is None or not (isinstance(dataset, Dataset) and "pair_index" in dataset.column_names):
            logger.info("head_init='em' needs cached features (a frozen backbone): the heads start at random.")
            return
        rows = torch.tensor(dataset["pair_index"], dtype=torch.long)
        differences = bank.features["chosen_reward"][rows] - bank.features["rejected_reward"][rows]
        if self._groups_latents(args) and "latent_group" in dataset.column_names:
            groups = torch.tensor(dataset["latent_group"], dtype=torch.long)
        else:
            groups = torch.arange(len(rows))
        heads = em_initial_heads(
            differences.float(),
            groups,
            model.config.num_heads,
            restarts=args.head_init_restarts,
            l2=args.head_init_l2,
            seed=args.seed,
            holdout=args.head_init_holdout,
            show_progress=not args.disable_tqdm,
        )
        with torch.no_grad():
            model.heads.weight.copy_(heads.to(model.heads.weight))
        model.heads_untrained = False

    @staticmethod
    def _groups_latents(args) -> bool:
        return args.loss_type == "mixture" and args.latent_groups == "prompt_chosen"

    def get_train_dataloader(self):
        """TRL's loader, except that pairs of one latent group (see `latent_groups`) always share a batch."""
        dataset = self.train_dataset
        if not (
            isinstance(dataset, Dataset) and "latent_group" in dataset.column_names and self._groups_latents(self.args)
        ):
            return super().get_train_dataloader()
        dataset = self._remove_unused_columns(dataset, description="training")
        sampler = GroupedBatchSampler(dataset["latent_group"], self._train_batch_size, seed=self.args.seed)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    @classmethod
    def _drop_overlong(cls, dataset, max_length, dataset_name):
        """Pairs with a sequence over `max_length` tokens are dropped (as in TRL), and the count is reported."""
        if max_length is None:
            return dataset
        return cls._drop_pairs(
            dataset,
            lambda example: len(example["chosen_ids"]) <= max_length and len(example["rejected_ids"]) <= max_length,
            dataset_name,
            f"longer than max_length={max_length} tokens",
            "raise `max_length` or shorten the texts",
        )

    @staticmethod
    def _drop_pairs(dataset, keep: Callable, dataset_name: str, what: str, fix: str):
        """
        The pairs `keep` accepts. A `Dataset` reports how many pairs were dropped and refuses to lose them all; a
        streaming `IterableDataset` filters as it streams and warns at the first pair it drops.
        """
        if not isinstance(dataset, Dataset):
            warned = False

            def keep_and_warn(example):
                nonlocal warned
                kept = keep(example)
                if not kept and not warned:
                    warned = True
                    logger.warning(f"Dropping {dataset_name} pairs {what} as they stream: {fix}.")
                return kept

            return dataset.filter(keep_and_warn)
        before = len(dataset)
        dataset = dataset.filter(keep, desc=f"Dropping {dataset_name} pairs {what}")
        if len(dataset) == 0:
            raise ValueError(f"Every pair of the {dataset_name} dataset is {what}: {fix}.")
        if len(dataset) < before:
            logger.warning(f"Dropped {before - len(dataset)} of {before} {dataset_name} pairs {what}: {fix}.")
        return dataset

    def _cache_features(self, dataset: Dataset, args, dataset_name: str) -> Dataset:
        model = self._features_model
        with args.main_process_first(desc=f"caching {dataset_name} features"):
            features = pair_features(
                model.to(args.device),
                dataset,
                cache_dir=args.feature_cache_dir,
                batch_size=args.feature_batch_size,
                desc=f"Backbone features ({dataset_name})",
            )
        offset = self._feature_bank.add(features)
        columns = {"pair_index": list(range(offset, offset + len(dataset)))}
        for label in PAIR_LABEL_COLUMNS:
            if label in dataset.column_names:
                columns[label] = dataset[label]
        return Dataset.from_dict(columns)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*TOKENIZED_COLUMNS, *PAIR_LABEL_COLUMNS, "pair_index"]

    # ----------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        margin = inputs.pop("margin", None)
        context_index = inputs.pop("context_index", None)
        latent_group = inputs.pop("latent_group", None)
        outputs = model(**inputs)
        chosen_rewards, rejected_rewards = outputs.head_rewards.chunk(2)
        head_margins = chosen_rewards - rejected_rewards
        router_logits = outputs.router_logits.chunk(2)[0]  # chosen and rejected share the prompt
        mixture_weights = torch.softmax(router_logits.float(), dim=-1)

        args: MiCRoRewardConfig = self.args
        if args.loss_type == "ensemble":
            nll = ensemble_bt_loss(head_margins, margin).mean()
            loss = nll
        else:
            nll = self.mixture_nll(head_margins, router_logits, margin, context_index, latent_group)
            loss = nll
            if head_margins.shape[-1] > 1 and args.router_balance_coef > 0:
                loss = loss + args.router_balance_coef * balance_penalty(mixture_weights)
            if head_margins.shape[-1] > 1 and args.router_entropy_coef > 0:
                loss = loss + args.router_entropy_coef * entropy_penalty(mixture_weights)
        routed = outputs.logits.squeeze(-1)
        if args.center_rewards_coefficient is not None:
            loss = loss + args.center_rewards_coefficient * routed.pow(2).mean()

        self._record_metrics(mode, routed, head_margins, mixture_weights, nll)
        return (loss, outputs) if return_outputs else loss

    def mixture_nll(self, head_margins, router_logits, margin=None, context_index=None, latent_group=None):
        """The mixture BT loss of the batch: a latent head per latent group when the batch has them, else per pair
        (Stage 1 does not use `context_index`)."""
        if latent_group is not None:
            return context_mixture_bt_loss(head_margins, router_logits, latent_group, margin).mean()
        return mixture_bt_loss(head_margins, router_logits, margin).mean()

    @torch.no_grad()
    def _record_metrics(self, mode, routed, head_margins, mixture_weights, nll):
        routed_chosen, routed_rejected = routed.chunk(2)
        values = {
            "mixture_nll": nll.detach(),
            "accuracy": (routed_chosen > routed_rejected).float().mean(),
            "margin": (routed_chosen - routed_rejected).mean(),
            "mean_reward": routed.mean(),
            "router_entropy": entropy(mixture_weights).mean(),
        }
        if head_margins.shape[-1] > 1:
            values["balance_penalty"] = balance_penalty(mixture_weights)
            values["head_agreement"] = head_agreement(head_margins)
            for k in range(head_margins.shape[-1]):
                values[f"head_accuracy/{k}"] = (head_margins[:, k] > 0).float().mean()
                values[f"head_usage/{k}"] = mixture_weights[:, k].mean()
        names = list(values)
        stacked = torch.stack([values[name].float() for name in names])
        gathered = self.accelerator.gather_for_metrics(stacked[None]).mean(dim=0)
        for name, value in zip(names, gathered.tolist()):
            self._metrics[mode][name].append(value)
