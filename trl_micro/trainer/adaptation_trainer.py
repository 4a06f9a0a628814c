r"""
Stage 2, router adaptation: teach the router of a Stage 1 MiCRo model to read a context (a user, a criterion, a
persona) from a few labelled pairs, with the backbone and the K heads frozen.

Each pair's prompt x carries its context c (joined by the model's `context_template`), and the router reads the last
prompt token, so its weights w(x, c; theta) depend on the context. With the heads fixed, the per-pair margins
delta_k = r_k(x, c, y_w) - r_k(x, c, y_l) are constants and the objective is

    L(theta) = mean_pairs -log sum_k w_k(x, c; theta) sigmoid(delta_k)  +  lambda ||theta - theta_1||^2,

the mixture BT loss of Stage 1 as a function of the router alone (a maximum-likelihood fit of which heads the
context's raters follow), plus an optional pull toward the Stage 1 router theta_1 (`router_anchor_coef` = lambda).
With `adaptation_likelihood="context"` the first term is `context_mixture_bt_loss` instead (`trl_micro.losses`): one
latent head for all the pairs of a context in the batch, the rows sharing a context text.
Because the router reads the context's text rather than an id, it routes contexts it never saw (paraphrases, new
criteria) by what the backbone makes of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase

from ..configuration_micro import MiCRoConfig, checkpoint_model_type
from ..data_utils import LEGACY_TOKENIZED_COLUMNS, TOKENIZED_COLUMNS, TRL_TOKENIZED_COLUMNS, context_indices
from ..losses import context_mixture_bt_loss
from ..modeling_micro import MiCRoRewardModel
from .adaptation_config import RouterAdaptationConfig
from .micro_trainer import MiCRoRewardTrainer, build_micro_model


def load_stage1_model(model_id: str, args: RouterAdaptationConfig, quantization_config=None) -> MiCRoRewardModel:
    """Load a Stage 1 MiCRo checkpoint (with `args.model_init_kwargs` and `quantization_config`, as
    `build_micro_model`); a plain backbone is refused (its heads would be untrained)."""
    model_type = checkpoint_model_type(model_id)
    if model_type != MiCRoConfig.model_type:
        raise ValueError(
            f"{model_id} is not a MiCRo checkpoint (model_type={model_type!r}). Router adaptation starts from a "
            "Stage 1 model: train one first with MiCRoRewardTrainer (recipes/train_micro_rm.py)."
        )
    return build_micro_model(model_id, args, quantization_config)


def check_context_column(column_names: list[str], context_column: str, dataset_name: str) -> None:
    if context_column not in column_names:
        raise ValueError(
            f"The {dataset_name} dataset has no context column {context_column!r}; columns present: "
            f"{sorted(column_names)}. Router adaptation needs every pair's context text (a user description, a "
            "criterion, a persona); name its column with `context_column`."
        )


def check_contexts(
    contexts: list,
    tokenizer: PreTrainedTokenizerBase,
    context_column: str,
    max_context_length: int | None,
    dataset_name: str,
) -> None:
    """Every context must be non-empty text of at most `max_context_length` tokens; errors name the first bad row."""
    for index, context in enumerate(contexts):
        where = f"Row {index} of the {dataset_name} dataset: `{context_column}`"
        if context is None:
            raise ValueError(
                f"{where} is None. Every adaptation pair needs its context text; fill it in or drop the row."
            )
        if not isinstance(context, str):
            raise ValueError(f"{where} must be text, got {type(context).__name__} ({context!r}).")
        if not context.strip():
            raise ValueError(
                f"{where} is empty. Every adaptation pair needs its context text; fill it in or drop the row."
            )
    if max_context_length is None:
        return
    lengths = [len(ids) for ids in tokenizer(contexts, add_special_tokens=False)["input_ids"]]
    for index, length in enumerate(lengths):
        if length > max_context_length:
            raise ValueError(
                f"Row {index} of the {dataset_name} dataset: `{context_column}` has {length} tokens, more than "
                f"max_context_length={max_context_length}. Shorten it (a sentence or two describing the user or the "
                "criterion is enough) or raise `max_context_length`."
            )


class RouterAdaptationTrainer(MiCRoRewardTrainer):
    """
    [`MiCRoRewardTrainer`] that fits only the router of a Stage 1 model on context-labelled pairs (see the module
    docstring for the objective).

    `model` is a [`MiCRoRewardModel`] or the path of a MiCRo checkpoint, with a router (`use_router=True`). Every
    parameter but the router's is frozen, so with `args.use_feature_cache` (the default) the backbone runs once over
    the data and the epochs train on cached features. The dataset must be a `datasets.Dataset` with a context column
    (`args.context_column`) holding non-empty text of at most `args.max_context_length` tokens.

    Logs the metrics of Stage 1 plus `router_drift`, `||theta - theta_1||^2`. The trained model saves and loads like
    any MiCRo checkpoint; its `logits` are the reward routed for the context in the prompt.
    """

    config_class = RouterAdaptationConfig

    _tag_names = [*MiCRoRewardTrainer._tag_names, "router-adaptation"]
    _name = "MiCRo Router Adaptation"

    def __init__(
        self,
        model: str | MiCRoRewardModel,
        args: RouterAdaptationConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs,
    ):
        args = args if args is not None else RouterAdaptationConfig("micro-router-adaptation")
        if not isinstance(args, RouterAdaptationConfig):
            raise TypeError(f"`args` must be a RouterAdaptationConfig, got {type(args).__name__}.")
        if kwargs.pop("peft_config", None) is not None:
            raise ValueError("Router adaptation trains the router's own weights; it takes no `peft_config`.")
        if isinstance(model, str):
            model = load_stage1_model(model, args, kwargs.pop("quantization_config", None))
            self._model_built_from_path = True  # with `model_init_kwargs`: TRL must not call them ignored
        if is_peft_model(model):
            raise ValueError(
                "Router adaptation trains the router of a plain MiCRo model, not a PeftModel: merge the adapter first "
                "(`model = model.merge_and_unload()`, or load the LoRA run with MiCRoRewardModel.from_pretrained(run))."
            )
        if isinstance(model, MiCRoRewardModel):
            if not model.config.use_router:
                raise ValueError(
                    "This model has no router (use_router=False, StaticMixture): its weights ignore the prompt, so "
                    "there is nothing that could read a context. Adapt a model trained with use_router=True."
                )
            model.requires_grad_(False)
            model.router.requires_grad_(True)
            self._stage1_router = {name: p.detach().clone() for name, p in model.router.named_parameters()}
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)
        if isinstance(model, MiCRoRewardModel):  # TRL's __init__ may have resized the embeddings (chat_template_path)
            model.requires_grad_(False)
            model.router.requires_grad_(True)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"Router adaptation takes a datasets.Dataset for {dataset_name} (adaptation sets are small and their "
                "backbone features are cached); materialize the IterableDataset, e.g. Dataset.from_list(list(data))."
            )
        already_prepared = "pair_index" in dataset.column_names or set(TOKENIZED_COLUMNS) <= set(dataset.column_names)
        token_columns = [c for c in (*TRL_TOKENIZED_COLUMNS, *LEGACY_TOKENIZED_COLUMNS) if c in dataset.column_names]
        if not already_prepared and token_columns:
            raise ValueError(
                f"The {dataset_name} dataset is pre-tokenized ({token_columns}): router adaptation joins each pair's "
                "context to its prompt, which token ids cannot take. Pass the text pairs (`prompt`, `chosen`, "
                f"`rejected`) with the context column {args.context_column!r}."
            )
        if not already_prepared:
            check_context_column(dataset.column_names, args.context_column, dataset_name)
            contexts = list(dataset[args.context_column])
            check_contexts(contexts, processing_class, args.context_column, args.max_context_length, dataset_name)
            if args.adaptation_likelihood == "context" and "context_index" not in dataset.column_names:
                dataset = dataset.add_column("context_index", context_indices(contexts))
        elif args.adaptation_likelihood == "context" and "context_index" not in dataset.column_names:
            raise ValueError(
                f"The {dataset_name} dataset is already tokenized or cached, so its contexts cannot be read: with "
                "adaptation_likelihood='context' give it a `context_index` column (an integer id per context), or "
                "pass the raw pairs with their context column."
            )
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _initialize_heads(self) -> None:
        """Stage 2 adapts the router over the Stage 1 heads: it never replaces them (`head_init` does not apply)."""

    def mixture_nll(self, head_margins, router_logits, margin=None, context_index=None, latent_group=None):
        """Per-pair (`adaptation_likelihood="pair"`) or per-context (`"context"`) mixture BT loss of the batch."""
        if self.args.adaptation_likelihood == "pair":
            return super().mixture_nll(head_margins, router_logits, margin)
        if context_index is None:
            raise ValueError(
                "adaptation_likelihood='context' needs a `context_index` in every batch; the data "
                "collator dropped it (use the trainer's default collator or pass it through)."
            )
        return context_mixture_bt_loss(head_margins, router_logits, context_index, margin).mean()

    def router_drift(self) -> torch.Tensor:
        """||theta - theta_1||^2: squared distance of the router's parameters from their Stage 1 values."""
        router = self.accelerator.unwrap_model(self.model).router
        return sum(
            (parameter - self._stage1_router[name].to(parameter.device)).pow(2).sum()
            for name, parameter in router.named_parameters()
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        drift = self.router_drift()
        if self.args.router_anchor_coef > 0:
            loss = loss + self.args.router_anchor_coef * drift
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["router_drift"].append(drift.item())
        return (loss, outputs) if return_outputs else loss
