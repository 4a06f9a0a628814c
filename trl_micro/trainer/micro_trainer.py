"""Stage 1: train a MiCRo reward model (mixture of Bradley-Terry heads + router) on ordinary preference pairs."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, set_seed
from trl import RewardTrainer
from trl.data_utils import get_dataset_column_names, is_conversational

from ..configuration_micro import checkpoint_model_type
from ..data_utils import (
    LEGACY_TOKENIZED_COLUMNS,
    PAIR_LABEL_COLUMNS,
    TOKENIZED_COLUMNS,
    TRL_TOKENIZED_COLUMNS,
    add_prompt_lengths,
    assistant_header,
    check_margins,
    check_preference_columns,
    completion_end_of_ids,
    completion_end_token_ids,
    find_last,
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
from .base_config import MiCRoBaseConfig
from .data_collator import GroupedBatchSampler, MiCRoPreferenceCollator, latent_groups, user_latent_groups
from .head_initialization import em_initial_heads
from .lora import check_peft_model, prepare_peft_config
from .micro_config import MiCRoRewardConfig
from .pair_filters import drop_identical_pairs, drop_overlong

logger = logging.getLogger(__name__)


def model_loading_kwargs(args: MiCRoBaseConfig, quantization_config=None) -> dict:
    """
    `args.model_init_kwargs` as TRL's reward trainer completes them before loading a model by path: the trainer's
    `quantization_config` (refused when `model_init_kwargs` has one too), `device_map=None` under distributed training,
    `trust_remote_code` from `args` unless given. `num_labels` may only be 1 (the routed reward is one score).
    """
    init_kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in init_kwargs:
            raise ValueError(
                "You set `quantization_config` both as a trainer argument and in `args.model_init_kwargs`. Please set "
                "it in only one place, preferably as a trainer argument."
            )
        init_kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        init_kwargs["device_map"] = None  # distributed training requires device_map=None ("auto" fails)
    if init_kwargs.pop("num_labels", 1) != 1:
        raise ValueError(
            "`model_init_kwargs['num_labels']` must be 1 (or left out): a MiCRo model's routed reward is one score."
        )
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return init_kwargs


def build_micro_model(model_id: str, args: MiCRoBaseConfig, quantization_config=None) -> MiCRoRewardModel:
    """
    Load a MiCRo checkpoint, or wrap a backbone checkpoint with fresh heads and router built from `args`, drawn after
    `set_seed(args.seed)` so that one seed gives one start (the Trainer seeds only after its model exists). Every
    `args.model_init_kwargs` entry (`dtype`, default float32 as in TRL; `attn_implementation`, `revision`,
    `device_map`, ...) and `quantization_config` go to the checkpoint's or the backbone's `from_pretrained`
    (`model_loading_kwargs`).
    """
    init_kwargs = model_loading_kwargs(args, quantization_config)
    dtype = init_kwargs.pop("dtype", init_kwargs.pop("torch_dtype", torch.float32))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if checkpoint_model_type(model_id) == "micro":
        return MiCRoRewardModel.from_pretrained(model_id, dtype=dtype, **init_kwargs)
    set_seed(args.seed)
    return MiCRoRewardModel.from_backbone(
        model_id, dtype=dtype, backbone_kwargs=init_kwargs, **args.architecture_kwargs()
    )


@contextmanager
def model_init_kwargs_consumed(args: MiCRoBaseConfig, consumed: bool):
    """
    Hide `args.model_init_kwargs` from TRL's `__init__` while it runs when the trainer built the model from a path
    with them: TRL would warn that they are ignored, seeing an instantiated model.
    """
    saved = args.model_init_kwargs
    if consumed:
        args.model_init_kwargs = None
    try:
        yield
    finally:
        args.model_init_kwargs = saved


# What a MiCRo model outputs besides TRL's `logits` (the routed reward).
MICRO_OUTPUTS = ["head_rewards", "router_logits", "mixture_weights", "reward_features", "router_features"]


class FeaturesOrSequencesCollator:
    """
    Batches of cached pairs (rows with `pair_index`) from the feature bank, and of token rows (a streaming or
    uncached evaluation set) with the sequence collator: a trainer on cached features still evaluates any dataset.
    """

    def __init__(self, features: CachedFeatureCollator, sequences: Callable):
        self.features, self.sequences = features, sequences

    def __call__(self, examples):
        return (self.features if "pair_index" in examples[0] else self.sequences)(examples)


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

    Everything TRL's `RewardTrainer` takes works as there (docs/trainer_parity.md): pre-tokenized `chosen_ids` /
    `rejected_ids` (each pair's prompt is the ids both share, cut at the prompt marker), the `tools` and
    `chat_template_kwargs` columns, `chat_template_path`, `eos_token`, every `model_init_kwargs` entry and the
    `quantization_config` argument for a path, a `peft_config` (heads and router trained and saved in full beside the
    adapter, `target_modules` inferred from the backbone when unset; see `trl_micro.trainer.lora`) or a `PeftModel` as
    `model`. A LoRA run's saved folder loads with `MiCRoRewardModel.from_pretrained(folder)`, the adapter merged.

    Logged: TRL's reward metrics (`num_tokens`, `min_reward`, `mean_reward`, `max_reward`, `accuracy`, `margin`, on the
    routed reward), plus `mixture_nll`, `head_accuracy/k`, `head_usage/k`, `router_entropy`, `head_agreement` (the
    share of pairs two heads rank alike, averaged over head pairs; a warning at the end of training says when it stays
    near 1: the heads have not separated) and the regularizers. Every save also writes the model card, with a card per
    head (`trl_micro.model_card`).
    """

    config_class = MiCRoRewardConfig  # what `args` must be (Stage 2's trainer takes its own)

    _tag_names = ["trl", "reward-trainer", "trl-micro"]
    _name = "MiCRo Reward"

    def __init__(
        self,
        model: str | MiCRoRewardModel,
        args: MiCRoRewardConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        peft_config=None,
        quantization_config=None,
        **kwargs,
    ):
        args = args if args is not None else self.config_class("micro-reward")
        if not isinstance(args, self.config_class):
            raise TypeError(f"`args` must be a {self.config_class.__name__}, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        first_example = next(iter(train_dataset), None)
        if first_example is None:
            raise ValueError("The train dataset is empty: MiCRoRewardTrainer needs at least one preference pair.")
        built_here = isinstance(model, str) or getattr(self, "_model_built_from_path", False)
        if isinstance(model, str):
            model = build_micro_model(model, args, quantization_config)
            quantization_config = None  # used: TRL would call it ignored
        micro_model = self._micro_model(model, peft_config, args)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                micro_model.config._name_or_path,
                revision=(args.model_init_kwargs or {}).get("revision") if built_here else None,
                trust_remote_code=args.trust_remote_code,
            )
        if args.freeze_backbone:
            micro_model.freeze_backbone()
        if peft_config is not None:
            peft_config = prepare_peft_config(peft_config, micro_model)

        self._feature_bank = self._make_feature_bank(
            args, peft_config is not None or is_peft_model(model), train_dataset, eval_dataset, data_collator
        )
        self._features_model = micro_model  # the backbone the cache is computed with, before any wrapping
        self._keep_card_pairs(train_dataset, eval_dataset)
        with model_init_kwargs_consumed(args, built_here):
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                peft_config=peft_config,
                quantization_config=quantization_config,
                **kwargs,
            )
        # After TRL's __init__, which set the tokenizer's `eos_token`, chat template (`chat_template_path`) and pad token
        self._set_prompt_marker(micro_model, self.processing_class, first_example, args)
        if args.freeze_backbone and not is_peft_model(self.model):
            micro_model.freeze_backbone()  # again: a cloned chat template may have resized the embeddings
        if data_collator is None:
            pad_to_multiple_of = args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None
            sequences = MiCRoPreferenceCollator(
                self.processing_class.pad_token_id, pad_to_multiple_of=pad_to_multiple_of
            )
            bank = self._feature_bank
            self.data_collator = FeaturesOrSequencesCollator(bank, sequences) if bank is not None else sequences

    @staticmethod
    def _micro_model(model, peft_config, args) -> MiCRoRewardModel:
        """The MiCRo model `model` is or wraps (a `PeftModel` over one), after the checks that refuse what cannot train."""
        if is_peft_model(model):
            if peft_config is not None:
                raise ValueError(
                    "You passed a `PeftModel` together with a `peft_config`. Merge the existing adapter first "
                    "(`model.merge_and_unload()`), then pass the merged model with the new `peft_config`, or pass the "
                    "PeftModel alone to continue training its adapter."
                )
            if args.freeze_backbone:
                raise ValueError(
                    "`freeze_backbone=True` with a PeftModel: its adapter lives in the backbone, so freezing the backbone "
                    "would freeze the adapter too. Set freeze_backbone=False (PEFT already keeps the base weights "
                    "frozen), or merge the adapter first."
                )
            return check_peft_model(model)
        if isinstance(model, MiCRoRewardModel):
            return model
        raise TypeError(
            f"`model` must be a MiCRoRewardModel, a PeftModel over one, or a path, got {type(model).__name__}. Wrap a "
            "backbone with `MiCRoRewardModel.from_backbone(...)`."
        )

    # ------------------------------------------------------------------------------------------------ preparation
    @classmethod
    def _set_prompt_marker(cls, model, tokenizer, first_example, args) -> None:
        """
        Store in the model the marker that ends prompts and the ids that end completions, so full texts can be
        routed and scored after training as they were in training: from the tokenizer as training left it (its
        `eos_token` and chat template set), and for pre-tokenized data from what the ids show (`completion_end_of_ids`;
        the chat template's assistant header is the marker when the ids contain it).
        """
        ids = next((first_example[name] for name in ("chosen_ids", "chosen_input_ids") if name in first_example), None)
        if "chosen" not in first_example and ids is not None:
            header = assistant_header(tokenizer)
            header_ids = marker_token_ids(tokenizer, header)
            marker = args.prompt_marker or (header if header_ids and find_last(ids, header_ids) else None)
            ending = completion_end_of_ids(tokenizer, ids)
        else:
            conversational = is_conversational({k: first_example[k] for k in ("chosen",) if k in first_example})
            marker = assistant_header(tokenizer) if conversational else args.prompt_marker
            ending = completion_end_token_ids(tokenizer, conversational)
        if marker is not None:
            model.config.prompt_marker = marker
            model.config.prompt_marker_ids = marker_token_ids(tokenizer, marker)
        model.config.completion_end_ids = ending

    def _ids_prompt_marker(self, tokenizer, args) -> list[int] | None:
        """The marker ids that cut a pre-tokenized pair's shared ids (`prompt_length_from_ids`): `args.prompt_marker`,
        else the chat template's assistant header."""
        return marker_token_ids(tokenizer, args.prompt_marker or assistant_header(tokenizer))

    @staticmethod
    def _make_feature_bank(args, adapter, train_dataset, eval_dataset, data_collator) -> CachedFeatureCollator | None:
        if not (args.freeze_backbone and args.use_feature_cache):
            return None
        eval_datasets = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        if any(isinstance(dataset, IterableDataset) for dataset in (train_dataset, *eval_datasets)):
            logger.warning(
                "Feature cache off: a streaming IterableDataset cannot be cached ahead of training, so the frozen "
                "backbone runs every step. Pass a datasets.Dataset to train on cached features."
            )
            return None
        if adapter:
            logger.info("Feature cache off: a PEFT adapter trains the backbone.")
            return None
        if data_collator is not None and not isinstance(data_collator, CachedFeatureCollator):
            logger.warning(
                "Feature cache off: the `data_collator` you passed batches token rows, not cached features, so the "
                "frozen backbone runs every step. Leave `data_collator` unset to train on cached features."
            )
            return None
        if args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3:
            logger.info("Feature cache off: ZeRO-3 partitions the backbone; features are computed every step.")
            return None
        return CachedFeatureCollator()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if isinstance(dataset, Dataset) and "pair_index" in dataset.column_names:  # already cached features
            if (
                self._groups_latents(args)
                and args.latent_groups == "user"
                and "latent_group" not in dataset.column_names
            ):
                # no tokens to group by: a pair without a user id is a group of its own (or of its repeats)
                users = self._user_ids(dataset, args, dataset_name)
                dataset = dataset.add_column("latent_group", user_latent_groups(users, dataset["pair_index"]))
            return dataset
        column_names = get_dataset_column_names(dataset)
        if "margin" in column_names and isinstance(dataset, Dataset):
            check_margins(dataset["margin"], f"the {dataset_name} dataset")
        if set(LEGACY_TOKENIZED_COLUMNS) <= set(column_names) and not set(TRL_TOKENIZED_COLUMNS) <= set(column_names):
            warnings.warn(
                "Detected legacy dataset columns `chosen_input_ids`/`rejected_input_ids`; they are deprecated (as in "
                "TRL, which will not support them in v1). Please migrate to `chosen_ids`/`rejected_ids`.",
                FutureWarning,
                stacklevel=2,
            )
            for legacy, name in zip(LEGACY_TOKENIZED_COLUMNS, TRL_TOKENIZED_COLUMNS):
                dataset = dataset.rename_column(legacy, name)
            column_names = get_dataset_column_names(dataset)
        if set(TRL_TOKENIZED_COLUMNS) <= set(column_names) and not set(TOKENIZED_COLUMNS) <= set(column_names):
            dataset = drop_identical_pairs(dataset, dataset_name, "chosen_ids", "rejected_ids")
            if args.context_column in column_names:
                raise ValueError(
                    f"The {dataset_name} dataset is pre-tokenized (`chosen_ids`, `rejected_ids`) and has a context "
                    f"column {args.context_column!r}, which cannot be joined to token ids. Put each context into the "
                    "prompt before tokenizing and drop the column, or pass the text columns (`prompt`, `chosen`, "
                    "`rejected`) with the context."
                )
            map_kwargs = {"desc": f"Prompt lengths of {dataset_name} dataset"} if isinstance(dataset, Dataset) else {}
            dataset = dataset.map(
                add_prompt_lengths,
                fn_kwargs={"marker_ids": self._ids_prompt_marker(processing_class, args)},
                **map_kwargs,
            )
            column_names = get_dataset_column_names(dataset)
        if not all(column in column_names for column in TOKENIZED_COLUMNS):
            check_preference_columns(column_names, dataset_name)
            dataset = drop_identical_pairs(dataset, dataset_name, "chosen", "rejected")
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
        dataset = drop_overlong(dataset, args.max_length, dataset_name)
        if self._groups_latents(args) and isinstance(dataset, Dataset) and "latent_group" not in dataset.column_names:
            if args.latent_groups == "user":
                users = self._user_ids(dataset, args, dataset_name)
                dataset = dataset.add_column("latent_group", user_latent_groups(users, dataset["chosen_ids"]))
            else:
                dataset = dataset.add_column("latent_group", latent_groups(dataset["chosen_ids"]))
        if self._feature_bank is not None and isinstance(dataset, Dataset):
            dataset = self._cache_features(dataset, args, dataset_name)
        return dataset

    def _keep_card_pairs(self, train_dataset, eval_dataset) -> None:
        """The card measures its heads on text pairs: pre-tokenized (or cached) data leaves the card without them."""
        super()._keep_card_pairs(train_dataset, eval_dataset)
        source, dataset = self._card_source
        first = next(iter(dataset.values()), None) if isinstance(dataset, dict) else dataset
        if first is not None and not {"chosen", "rejected"} <= set(get_dataset_column_names(first)):
            logger.info(f"The model card's head measurements need text pairs; the {source} dataset has none.")
            self._card_source = (source, None)

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
        return args.loss_type == "mixture" and args.latent_groups in ("prompt_chosen", "user")

    @staticmethod
    def _user_ids(dataset: Dataset, args, dataset_name: str) -> list:
        """The `user_column` of a dataset trained with `latent_groups="user"`; a clear error when it is missing."""
        if args.user_column not in dataset.column_names:
            raise ValueError(
                f"latent_groups='user' groups pairs by the user column {args.user_column!r}, which the {dataset_name} "
                f"dataset does not have (columns: {sorted(dataset.column_names)}). Set `user_column` (--user_column) "
                "to the column of user ids, or use latent_groups='prompt_chosen'."
            )
        return dataset[args.user_column]

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
        columns["pair_num_tokens"] = [
            len(chosen) + len(rejected) for chosen, rejected in zip(dataset["chosen_ids"], dataset["rejected_ids"])
        ]
        for label in PAIR_LABEL_COLUMNS:
            if label in dataset.column_names:
                columns[label] = dataset[label]
        return Dataset.from_dict(columns)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*TOKENIZED_COLUMNS, *PAIR_LABEL_COLUMNS, "pair_index"]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """`Trainer.evaluate` on a prepared or raw `eval_dataset` (one, or a dict of them; streaming ones too), as in
        TRL >= 1.13, which prepares raw ones itself; with TRL 1.12 the trainer prepares them here."""
        if eval_dataset is not None and not isinstance(eval_dataset, str) and "evaluate" not in vars(RewardTrainer):
            if isinstance(eval_dataset, dict):
                eval_dataset = {
                    key: self._prepare_dataset(dataset, self.processing_class, self.args, key)
                    for key, dataset in eval_dataset.items()
                }
            else:
                eval_dataset = self._prepare_dataset(eval_dataset, self.processing_class, self.args, "eval")
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """`Trainer.prediction_step`; unless `ignore_keys` says otherwise, the predictions `compute_metrics` gets are the
        routed rewards alone, as TRL's are a reward model's logits (pass `ignore_keys=[]` to `evaluate` for the
        head rewards, router logits, mixture weights and features too)."""
        if ignore_keys is None:
            ignore_keys = [*getattr(self.model.config, "keys_to_ignore_at_inference", []), *MICRO_OUTPUTS]
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _save(self, output_dir: str | None = None, state_dict=None):
        """`Trainer._save`; a PEFT run's folder also gets the MiCRo config and code, so that
        `MiCRoRewardModel.from_pretrained(folder)` (or `AutoModelForSequenceClassification` with
        `trust_remote_code=True`) loads it: the base model with the adapter merged."""
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            model.get_base_model().save_config_and_code(output_dir or self.args.output_dir)

    # ----------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        margin = inputs.pop("margin", None)
        context_index = inputs.pop("context_index", None)
        latent_group = inputs.pop("latent_group", None)
        pair_num_tokens = inputs.pop("pair_num_tokens", None)
        if "attention_mask" in inputs:
            num_tokens = inputs["attention_mask"].sum()
        else:  # cached features: the token counts ride along, unless the pairs were cached without them
            num_tokens = None if pair_num_tokens is None else pair_num_tokens.sum()
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
        if args.center_rewards_coefficient is not None:  # TRL's centering term, on the routed reward
            routed_chosen, routed_rejected = routed.chunk(2)
            loss = loss + args.center_rewards_coefficient * torch.mean((routed_chosen + routed_rejected) ** 2)

        if num_tokens is not None:
            self._count_tokens(mode, num_tokens)
        self._record_metrics(mode, routed, head_margins, mixture_weights, nll)
        return (loss, outputs) if return_outputs else loss

    def _count_tokens(self, mode: str, num_tokens: torch.Tensor) -> None:
        """TRL's `num_tokens`: the training tokens seen so far (chosen and rejected, no padding), in train and eval
        logs alike."""
        if mode == "train":
            gathered = self.accelerator.gather_for_metrics(num_tokens.detach()).sum().item()
            self._total_train_tokens += gathered // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def mixture_nll(self, head_margins, router_logits, margin=None, context_index=None, latent_group=None):
        """The mixture BT loss of the batch: a latent head per latent group when the batch has them, else per pair
        (Stage 1 does not use `context_index`)."""
        if latent_group is not None:
            return context_mixture_bt_loss(head_margins, router_logits, latent_group, margin).mean()
        return mixture_bt_loss(head_margins, router_logits, margin).mean()

    @torch.no_grad()
    def _record_metrics(self, mode, routed, head_margins, mixture_weights, nll):
        all_rewards = self.accelerator.gather(routed.detach())  # TRL's min / mean / max over every process's rewards
        self._metrics[mode]["min_reward"].append(all_rewards.min().item())
        self._metrics[mode]["mean_reward"].append(all_rewards.mean().item())
        self._metrics[mode]["max_reward"].append(all_rewards.max().item())
        routed_chosen, routed_rejected = routed.chunk(2)
        values = {
            "mixture_nll": nll.detach(),
            "accuracy": (routed_chosen > routed_rejected).float().mean(),
            "margin": (routed_chosen - routed_rejected).mean(),
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
