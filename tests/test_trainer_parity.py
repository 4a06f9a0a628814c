"""
TRL's `RewardTrainer` and the MiCRo trainers side by side, on tiny local models: every argument, config field and
dataset column of TRL's reward trainer either does in MiCRo what it does in TRL (the same token ids, the same loss
terms, the same logged names) or is refused at init with an error naming it. docs/trainer_parity.md is the table.

The inventory test lists what the installed TRL's reward trainer takes (its `__init__` arguments, `RewardConfig`'s own
fields and defaults, the dataset columns its preprocessing reads) and fails on any name without a row in `FEATURES`:
a TRL release that adds a feature shows up here, not as a silent difference.

Rows that fixed a finding of issue 41 name it (`finding`); each failed before its fix.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import re
import subprocess
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer
from trl.trainer import reward_trainer

from trl_micro import MiCRoRewardConfig, MiCRoRewardModel, MiCRoRewardTrainer
from trl_micro.data_utils import join_context
from trl_micro.rewards import MiCRoReward
from trl_micro.testing_utils import CHATML_TEMPLATE, build_tiny_micro_model, save_tiny_backbone
from trl_micro.trainer import RouterAdaptationConfig, RouterAdaptationTrainer, prepare_peft_config

from .conftest import REPO_ROOT, make_conflicting_pairs

TRL_PREPARES_EVAL_DATASETS = "evaluate" in vars(RewardTrainer)  # TRL >= 1.13: evaluate() tokenizes raw datasets
CONTEXT_TEMPLATE = "{context}\n\n"  # MiCRoConfig's default, how a context joins a prompt

# ------------------------------------------------------------------------------------------------------ templates
# ChatML whose role names are upper-cased with `role_capital=True`: a template argument that changes the tokens.
ROLE_CAPITAL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + (message['role'].upper() if role_capital else message['role']) + '\n' + message['content']"
    " + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>' + ('ASSISTANT' if role_capital else 'assistant') + '\n' }}"
    "{%- endif -%}"
)
# ChatML that lists the tools in a system block and renders tool calls.
TOOLS_TEMPLATE = (
    "{%- if tools -%}{{ '<|im_start|>system\nTools:' }}{%- for tool in tools -%}{{ ' ' + tool['function']['name'] }}"
    "{%- endfor -%}{{ '<|im_end|>\n' }}{%- endif -%}"
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['tool_calls'] -%}{%- for call in message['tool_calls'] -%}"
    "{{ 'call ' + call['function']['name'] + ' ' + call['function']['arguments'] }}{%- endfor -%}"
    "{%- else -%}{{ message['content'] }}{%- endif -%}{{ '<|im_end|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# ----------------------------------------------------------------------------------------------------------- data
def rows_of(num_pairs: int = 8, conversational: bool = False, implicit: bool = False) -> list[dict]:
    """Preference rows with a `context` column (TRL's formats: explicit or implicit prompt, text or messages)."""
    rows = make_conflicting_pairs(num_pairs, conversational=conversational).remove_columns("taste").to_list()
    if implicit:
        rows = [
            {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"], "context": r["context"]}
            for r in rows
        ]
    return rows


def tool_rows(tools_as_json: bool, calls_only: bool = False) -> list[dict]:
    """Conversations whose chosen turn calls a tool (with text, or `calls_only`), and a `tools` column."""
    rows = []
    for i, row in enumerate(rows_of(8, conversational=True)):
        call = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": f"c{i}"})}}
        content = None if calls_only else "Let me check."
        row["chosen"] = [{"role": "assistant", "content": content, "tool_calls": [call]}]
        row["tools"] = json.dumps([WEATHER_TOOL]) if tools_as_json else [WEATHER_TOOL]
        rows.append(row)
    return rows


def template_kwargs_rows() -> list[dict]:
    return [{**row, "chat_template_kwargs": {"role_capital": bool(i % 2)}} for i, row in enumerate(rows_of(8, True))]


def pretokenized_rows(tokenizer, names=("chosen_ids", "rejected_ids")) -> list[dict]:
    """TRL's pre-tokenized format, as TRL's own test makes it: the texts tokenized, no EOS appended."""
    return [
        {
            names[0]: tokenizer(r["prompt"] + r["chosen"])["input_ids"],
            names[1]: tokenizer(r["prompt"] + r["rejected"])["input_ids"],
        }
        for r in rows_of(8)
    ]


def margin_rows() -> list[dict]:
    return [{**row, "margin": float(i % 3)} for i, row in enumerate(rows_of(8))]


def trl_view(rows: list[dict]) -> list[dict]:
    """The rows as TRL must see them to tokenize what MiCRo tokenizes: each context joined to its prompt (MiCRo's
    `context_template`: before a text prompt, as the system message of a conversation), the column dropped."""
    viewed = []
    for row in rows:
        row = dict(row)
        context = row.pop("context", None)
        if context is not None and "prompt" in row:
            row["prompt"] = join_context(row["prompt"], context, CONTEXT_TEMPLATE)
        elif context is not None:
            for side in ("chosen", "rejected"):
                if isinstance(row[side], str):
                    row[side] = join_context(row[side], context, CONTEXT_TEMPLATE)
                else:
                    row[side] = join_context(row[side][:-1], context, CONTEXT_TEMPLATE) + row[side][-1:]
        viewed.append(row)
    return viewed


# ---------------------------------------------------------------------------------------------------- trainers
def common_args(output_dir, **overrides) -> dict:
    return dict(
        output_dir=str(output_dir),
        report_to="none",
        bf16=False,
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        logging_steps=1,
        learning_rate=1e-2,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **overrides,
    )


VARIANTS = ("micro", "micro_frozen", "stage2")


def variant_config(variant: str, tmp_path) -> dict:
    """MiCRo's own fields for each way of running it: K = 2 trained end to end, on a frozen backbone (cached
    features), and Stage 2 (router adaptation of a Stage 1 checkpoint)."""
    micro = dict(num_heads=2, feature_cache_dir=str(tmp_path / "cache"), model_card_pairs=0)
    if variant == "micro":
        return micro
    if variant == "micro_frozen":
        return {**micro, "freeze_backbone": True, "head_init": "random"}
    return {"feature_cache_dir": str(tmp_path / "cache"), "model_card_pairs": 0}


def trl_trainer(backbone, tokenizer, rows, tmp_path, config=None, **kwargs) -> RewardTrainer:
    """TRL's trainer, the control (MiCRo's own fields in `config` left out)."""
    config = {key: value for key, value in (config or {}).items() if key in RewardConfig.__dataclass_fields__}
    args = RewardConfig(**common_args(tmp_path / "trl", **config))
    data = rows if not isinstance(rows, list) else Dataset.from_list(rows)
    return RewardTrainer(model=backbone, args=args, train_dataset=data, processing_class=tokenizer, **kwargs)


def trl_trainer_evaluating(backbone, tokenizer, rows, evaluation, tmp_path, config, **kwargs) -> RewardTrainer:
    """TRL's trainer on `rows` with a copy of `tokenizer`, evaluated on `evaluation` (both in TRL's view)."""
    evaluation = Dataset.from_list(trl_view(evaluation))
    return trl_trainer(backbone, fresh(tokenizer), trl_view(rows), tmp_path, config, eval_dataset=evaluation, **kwargs)


def micro_trainer(variant, backbone, stage1, tokenizer, rows, tmp_path, config=None, **kwargs):
    """The MiCRo trainer of `variant` on `rows` (a list, or a dataset passed as it is)."""
    config = {**variant_config(variant, tmp_path), **(config or {})}
    data = rows if not isinstance(rows, list) else Dataset.from_list(rows)
    if variant == "stage2":
        args = RouterAdaptationConfig(**common_args(tmp_path / variant, **config))
        return RouterAdaptationTrainer(
            model=stage1, args=args, train_dataset=data, processing_class=tokenizer, **kwargs
        )
    args = MiCRoRewardConfig(**common_args(tmp_path / variant, **config))
    return MiCRoRewardTrainer(model=backbone, args=args, train_dataset=data, processing_class=tokenizer, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine extra threads slow small ops (the EM start
    of the README's run) by an order of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, tokenizer):
    return save_tiny_backbone(str(tmp_path_factory.mktemp("parity") / "backbone"), tokenizer)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tokenizer):
    """A Stage 1 checkpoint for router adaptation (K = 2, the tiny backbone)."""
    path = tmp_path_factory.mktemp("parity") / "stage1"
    build_tiny_micro_model(tokenizer, num_heads=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def fresh(tokenizer):
    return copy.deepcopy(tokenizer)  # the trainers set the pad / EOS token and chat template on the tokenizer


def stage1_trainer(model, stage1, tokenizer, tmp_path, config=None, **kwargs):
    """The Stage 1 ("micro") trainer of `model` on 8 rows with a copy of `tokenizer` (`micro_trainer`)."""
    return micro_trainer("micro", model, stage1, fresh(tokenizer), rows_of(8), tmp_path, config, **kwargs)


# ------------------------------------------------------------------------------------------------ token ids
@dataclass
class DataCase:
    """A dataset (and the config and tokenizer it needs) both trainers take; `stage2` is `None` when router adaptation
    takes it too, else the refusal it gives."""

    rows: object  # (tokenizer) -> rows
    config: dict = field(default_factory=dict)
    template: str | None = CHATML_TEMPLATE  # the tokenizer's chat template (None: none)
    template_path: str | None = None  # "jinja" or "tokenizer": `chat_template_path` gives the template instead
    stage2: str | None = None
    finding: int | None = None


DATA_CASES = {
    "standard explicit prompt": DataCase(lambda tok: rows_of(8)),
    "standard implicit prompt": DataCase(lambda tok: rows_of(8, implicit=True), config={"prompt_marker": "?\n"}),
    "conversational explicit prompt": DataCase(lambda tok: rows_of(8, True)),
    "conversational implicit prompt": DataCase(lambda tok: rows_of(8, True, implicit=True)),
    "margin column": DataCase(lambda tok: margin_rows()),
    "chat_template_kwargs column": DataCase(
        lambda tok: template_kwargs_rows(), template=ROLE_CAPITAL_TEMPLATE, finding=4
    ),
    "tools column (JSON text)": DataCase(lambda tok: tool_rows(True), template=TOOLS_TEMPLATE, finding=6),
    "tools column (list)": DataCase(lambda tok: tool_rows(False), template=TOOLS_TEMPLATE, finding=6),
    "tool calls without text": DataCase(lambda tok: tool_rows(True, calls_only=True), template=TOOLS_TEMPLATE),
    "eos_token": DataCase(lambda tok: rows_of(8), config={"eos_token": "<|endoftext|>"}, finding=11),
    "eos_token, conversational": DataCase(lambda tok: rows_of(8, True), config={"eos_token": "<|endoftext|>"}),
    "chat_template_path (.jinja file)": DataCase(
        lambda tok: rows_of(8, True), template=None, template_path="jinja", finding=5
    ),
    "chat_template_path (tokenizer folder)": DataCase(
        lambda tok: rows_of(8, True), template=None, template_path="tokenizer", finding=5
    ),
    "pre-tokenized chosen_ids / rejected_ids": DataCase(
        pretokenized_rows, stage2=r"pre-tokenized \(\['chosen_ids', 'rejected_ids'\]\).*context", finding=3
    ),
    "pre-tokenized chosen_input_ids (legacy)": DataCase(
        lambda tok: pretokenized_rows(tok, ("chosen_input_ids", "rejected_input_ids")),
        stage2=r"pre-tokenized \(\['chosen_input_ids', 'rejected_input_ids'\]\)",
        finding=3,
    ),
}


def case_tokenizer(case: DataCase, tokenizer, tmp_path):
    """A copy of the tokenizer with the case's chat template, and the config that installs it (chat_template_path)."""
    tokenizer = fresh(tokenizer)
    tokenizer.chat_template = case.template
    config = dict(case.config)
    if case.template_path == "jinja":
        path = tmp_path / "template.jinja"
        path.write_text(CHATML_TEMPLATE)
        config["chat_template_path"] = str(path)
    elif case.template_path == "tokenizer":
        source = fresh(tokenizer)
        source.chat_template = CHATML_TEMPLATE
        source.save_pretrained(tmp_path / "template_source")
        config["chat_template_path"] = str(tmp_path / "template_source")
    return tokenizer, config


def token_rows(trainer) -> list[tuple[list[int], list[int]]]:
    return [(row["chosen_ids"], row["rejected_ids"]) for row in trainer.train_dataset]


@pytest.mark.parametrize("variant", ["micro", "stage2"])
@pytest.mark.parametrize("case", list(DATA_CASES))
def test_token_ids_match_trl(case, variant, tokenizer, backbone, stage1, tmp_path):
    """Every training sequence has TRL's token ids (each context joined for TRL as MiCRo joins it), and the model
    stores the completion ending and prompt marker those sequences carry (so scoring full texts after training reads
    them as training did)."""
    spec = DATA_CASES[case]
    rows = spec.rows(tokenizer)
    trl_tok, config = case_tokenizer(spec, tokenizer, tmp_path)
    micro_tok, _ = case_tokenizer(spec, tokenizer, tmp_path)
    variant_only = {"use_feature_cache": False} if variant == "stage2" else {}
    if variant == "stage2" and spec.stage2 is not None:
        with pytest.raises(ValueError, match=spec.stage2):
            micro_trainer(variant, backbone, stage1, micro_tok, rows, tmp_path, {**config, **variant_only})
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy columns' deprecation (both trainers warn)
        expected = token_rows(trl_trainer(backbone, trl_tok, trl_view(rows), tmp_path, config))
        trainer = micro_trainer(variant, backbone, stage1, micro_tok, rows, tmp_path, {**config, **variant_only})
    assert token_rows(trainer) == expected
    model_config = trainer.model.config
    ending = model_config.completion_end_ids
    if ending:  # finding 11: the stored ending is the one every sequence ends with
        assert all(ids[-len(ending) :] == ending for pair in expected for ids in pair), (ending, expected[0])
    if "eos_token" in config and isinstance(rows[0]["chosen"], str):  # text ends with the EOS, as TRL appends it
        assert ending == [micro_tok.convert_tokens_to_ids(config["eos_token"])]
    if micro_tok.chat_template is not None and isinstance(rows[0].get("chosen"), list):
        assert model_config.prompt_marker == "<|im_start|>assistant\n"


def test_pretokenized_prompt_lengths_and_legacy_warning(tokenizer, backbone, stage1, tmp_path):
    """Pre-tokenized pairs: the prompt is the ids both sequences share (cut at the prompt marker when given), and the
    old column names are renamed with TRL's FutureWarning (finding 3)."""
    rows = pretokenized_rows(tokenizer, ("chosen_input_ids", "rejected_input_ids"))
    with pytest.warns(FutureWarning, match="chosen_input_ids"):
        trainer = micro_trainer("micro", backbone, stage1, fresh(tokenizer), rows, tmp_path, {"prompt_marker": "?\n"})
    row = trainer.train_dataset[0]
    prompt = tokenizer.decode(row["chosen_ids"][: row["chosen_prompt_length"]])
    assert prompt.endswith("?\n") and row["chosen_prompt_length"] == row["rejected_prompt_length"]
    assert trainer.model.config.completion_end_ids is None  # these ids end with no EOS: nothing to complete
    trainer.train()
    with pytest.raises(ValueError, match="pre-tokenized .* context column 'context'"):
        with_context = [{**r, "context": "x"} for r in pretokenized_rows(tokenizer)]
        micro_trainer("micro", backbone, stage1, fresh(tokenizer), with_context, tmp_path)


def test_eos_token_scoring_from_ids_matches_training(tokenizer, backbone, stage1, tmp_path):
    """With `eos_token`, a training sequence scored from its ids alone (as GRPO scores) gets no stale EOS appended:
    its head rewards equal those of training, which scores it with its prompt length (finding 11)."""
    config = {"eos_token": "<|endoftext|>", "reward_readout": "last"}
    trainer = stage1_trainer(backbone, stage1, tokenizer, tmp_path, config)
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    model = trainer.model.eval()
    with torch.no_grad():
        trained = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "prompt_lengths")}).head_rewards
        by_ids = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).head_rewards
    torch.testing.assert_close(by_ids, trained)


# ------------------------------------------------------------------------------------------------- loss terms
def trl_compute_loss(trainer, model, batch):
    """TRL's own `RewardTrainer.compute_loss`, run by `trainer` on `model`'s routed reward (the prompt lengths bound):
    the loss TRL computes from these rewards, and the metrics it records."""

    class RoutedReward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask, **ignored):  # TRL passes `use_cache` and `margin` along
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=batch["prompt_lengths"]
            )

    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "margin") if key in batch}
    loss = RewardTrainer.compute_loss(trainer, RoutedReward(), inputs)
    return loss.detach(), {key: list(values) for key, values in trainer._metrics["train"].items()}


def micro_compute_loss(trainer, batch):
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    loss = trainer.compute_loss(trainer.model, dict(batch))
    return loss.detach(), {key: list(values) for key, values in trainer._metrics["train"].items()}


def sequence_batch(trainer, tokenizer, rows):
    """The token batch of `rows` (tokenized as the trainer tokenizes, with MiCRo's collator)."""
    from trl_micro.data_utils import tokenize_pairs
    from trl_micro.trainer.data_collator import MiCRoPreferenceCollator

    tokenized = tokenize_pairs(Dataset.from_list(rows), tokenizer, CONTEXT_TEMPLATE, "context")
    if "margin" in rows[0]:
        tokenized = tokenized.add_column("margin", [row["margin"] for row in rows])
    return MiCRoPreferenceCollator(tokenizer.pad_token_id)(list(tokenized))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("coefficient", [None, 10.0])
def test_loss_terms_and_metrics_match_trl(variant, coefficient, tokenizer, backbone, stage1, tmp_path):
    """On one batch, with MiCRo's routed reward as the reward: the centering term MiCRo adds is the one TRL's own
    `compute_loss` adds (c * mean((r_chosen + r_rejected)^2), finding 8), and every metric TRL records has the value
    TRL gives it (`num_tokens`, `min_reward`, `mean_reward`, `max_reward`, `accuracy`, `margin`; finding 7). For
    the frozen backbone the batch is the cached features' one."""
    rows = margin_rows()[:4]
    config = {"center_rewards_coefficient": coefficient}
    trainer = micro_trainer(variant, backbone, stage1, fresh(tokenizer), margin_rows(), tmp_path, config)
    trainer.model.train()
    batch = sequence_batch(trainer, trainer.processing_class, rows)
    micro_batch = batch
    if variant != "micro":  # a trainer on cached features: batch the same pairs from its bank
        micro_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert "reward_features" in micro_batch
    micro_loss, micro_metrics = micro_compute_loss(trainer, micro_batch)
    trl_loss, trl_metrics = trl_compute_loss(trainer, trainer.model, batch)
    assert set(trl_metrics) <= set(micro_metrics), set(trl_metrics) - set(micro_metrics)
    for name, values in trl_metrics.items():
        assert micro_metrics[name] == pytest.approx(values, rel=1e-4, abs=1e-5), name
    if coefficient is not None:  # the term centering adds, in both trainers
        trainer.args.center_rewards_coefficient = None
        micro_plain, _ = micro_compute_loss(trainer, micro_batch)
        trl_plain, _ = trl_compute_loss(trainer, trainer.model, batch)
        assert (micro_loss - micro_plain).item() == pytest.approx((trl_loss - trl_plain).item(), rel=1e-4)


def test_single_head_loss_is_trls_loss(tokenizer, backbone, stage1, tmp_path):
    """K = 1 without a router: MiCRo's whole loss is TRL's (BT with margins, plus centering) on the same rewards."""
    config = {"num_heads": 1, "use_router": False, "center_rewards_coefficient": 0.5}
    trainer = micro_trainer("micro", backbone, stage1, fresh(tokenizer), margin_rows(), tmp_path, config)
    trainer.model.train()
    batch = sequence_batch(trainer, trainer.processing_class, margin_rows()[:4])
    micro_loss, _ = micro_compute_loss(trainer, batch)
    trl_loss, _ = trl_compute_loss(trainer, trainer.model, batch)
    assert micro_loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- logged names
def logged_keys(trainer) -> tuple[set, set]:
    train = set().union(*(entry for entry in trainer.state.log_history if "loss" in entry))
    evaluation = set().union(*(entry for entry in trainer.state.log_history if "eval_loss" in entry))
    return train, evaluation


@pytest.mark.parametrize("variant", VARIANTS)
def test_logged_names_include_trls(variant, tokenizer, backbone, stage1, tmp_path):
    """Training and evaluation logs carry every name TRL logs (`num_tokens`, `min_reward`, `max_reward`, ... and
    their `eval_` forms; finding 7), plus MiCRo's own."""
    rows, evaluation = rows_of(8), rows_of(4)
    config = {"eval_strategy": "steps", "eval_steps": 2}
    control = trl_trainer_evaluating(backbone, tokenizer, rows, evaluation, tmp_path, config)
    control.train()
    trainer = micro_trainer(
        variant, backbone, stage1, fresh(tokenizer), rows, tmp_path, config, eval_dataset=Dataset.from_list(evaluation)
    )
    trainer.train()
    (trl_train, trl_eval), (train, evaluated) = logged_keys(control), logged_keys(trainer)
    assert trl_train and trl_eval
    assert trl_train <= train, trl_train - train
    assert trl_eval <= evaluated, trl_eval - evaluated
    assert {"mixture_nll", "router_entropy", "eval_mixture_nll"} <= train | evaluated


# -------------------------------------------------------------------------------------------- streaming eval
@pytest.mark.parametrize("as_dict", [False, True])
@pytest.mark.parametrize("variant", ["micro", "micro_frozen"])
def test_evaluate_streaming_datasets_after_training(variant, as_dict, tokenizer, backbone, stage1, tmp_path):
    """`evaluate(eval_dataset=<IterableDataset>)`, or a dict of them, after training on a `Dataset`: as TRL does,
    on a frozen backbone's cached features too (finding 12)."""
    rows, evaluation = rows_of(8), rows_of(4)
    trainer = micro_trainer(variant, backbone, stage1, fresh(tokenizer), rows, tmp_path)
    trainer.train()
    stream = Dataset.from_list(evaluation).to_iterable_dataset()
    metrics = trainer.evaluate(eval_dataset={"a": stream, "b": stream} if as_dict else stream)
    assert metrics["eval_a_loss" if as_dict else "eval_loss"] > 0 and "eval_max_reward" in metrics
    if TRL_PREPARES_EVAL_DATASETS:  # the control: TRL evaluates the same stream
        control = trl_trainer(backbone, fresh(tokenizer), trl_view(rows), tmp_path)
        control.train()
        trl_stream = Dataset.from_list(trl_view(evaluation)).to_iterable_dataset()
        trl_metrics = control.evaluate(eval_dataset={"a": trl_stream, "b": trl_stream} if as_dict else trl_stream)
        assert set(trl_metrics) - {key for key in trl_metrics if "runtime" in key or "per_second" in key} <= set(
            metrics
        )


def test_stage2_refuses_streaming_evaluation(tokenizer, backbone, stage1, tmp_path):
    trainer = micro_trainer("stage2", backbone, stage1, fresh(tokenizer), rows_of(8), tmp_path)
    with pytest.raises(TypeError, match="materialize the IterableDataset"):
        trainer.evaluate(eval_dataset=Dataset.from_list(rows_of(4)).to_iterable_dataset())


# ------------------------------------------------------------------------------------------------------ model
def backbone_attention(trainer) -> str:
    model = trainer.accelerator.unwrap_model(trainer.model)
    inner = model.backbone if isinstance(model, MiCRoRewardModel) else model.model
    return inner.config._attn_implementation


def test_model_init_kwargs_are_all_honoured(tokenizer, backbone, stage1, tmp_path, caplog):
    """Every `model_init_kwargs` entry loads a backbone path as TRL loads it (dtype and attention implementation
    here), and TRL's warning that they are ignored appears only where they are: an instantiated model (finding 10)."""
    config = {"model_init_kwargs": {"dtype": "bfloat16", "attn_implementation": "eager"}}
    with caplog.at_level(logging.WARNING):
        control = trl_trainer(backbone, fresh(tokenizer), rows_of(8), tmp_path, config)
        trainer = stage1_trainer(backbone, stage1, tokenizer, tmp_path, config)
        adapted = micro_trainer("stage2", backbone, stage1, fresh(tokenizer), rows_of(8), tmp_path, config)
    assert "will be ignored" not in caplog.text
    for built in (control, trainer, adapted):
        assert backbone_attention(built) == "eager"
    assert trainer.model.backbone.dtype == torch.bfloat16 == adapted.model.backbone.dtype
    assert trainer.model.heads.weight.dtype == torch.float32  # MiCRo keeps its heads and router in float32
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model = build_tiny_micro_model(tokenizer, num_heads=2)
        stage1_trainer(model, stage1, tokenizer, tmp_path, config)
    assert "`model_init_kwargs` will be ignored" in caplog.text


REMOTE_CONFIG_CODE = """
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
"""
REMOTE_MODEL_CODE = """
import torch
from transformers import LlamaForSequenceClassification, LlamaModel, LlamaPreTrainedModel

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteModel(LlamaModel):
    config_class = TinyRemoteConfig


class TinyRemoteForSequenceClassification(LlamaForSequenceClassification):
    config_class = TinyRemoteConfig

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = TinyRemoteModel(config)
        self.score = torch.nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()
"""


def save_remote_code_backbone(path, tokenizer) -> str:
    """A tiny backbone whose model type only its own code (in the folder, `auto_map`) defines."""
    source = save_tiny_backbone(str(path), tokenizer)
    (path / "configuration_tiny_remote.py").write_text(REMOTE_CONFIG_CODE)
    (path / "modeling_tiny_remote.py").write_text(REMOTE_MODEL_CODE)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "tiny_remote"
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
        "AutoModel": "modeling_tiny_remote.TinyRemoteModel",
        "AutoModelForSequenceClassification": "modeling_tiny_remote.TinyRemoteForSequenceClassification",
    }
    (path / "config.json").write_text(json.dumps(config))
    return source


@pytest.mark.parametrize("trusted", [False, True])
def test_trust_remote_code_loads_a_backbone_as_trl_does(trusted, tokenizer, stage1, tmp_path):
    """`trust_remote_code` decides, as in TRL, whether a backbone that ships its own code loads."""
    backbone = save_remote_code_backbone(tmp_path / "remote_backbone", tokenizer)
    config = {"trust_remote_code": trusted}
    builders = (
        lambda: trl_trainer(backbone, fresh(tokenizer), rows_of(8), tmp_path, config),
        lambda: stage1_trainer(backbone, stage1, tokenizer, tmp_path, config),
    )
    for build in builders:
        if trusted:
            trainer = build()
            model = trainer.model.backbone if isinstance(trainer.model, MiCRoRewardModel) else trainer.model
            assert type(model).__name__.startswith("TinyRemote")
        else:
            with pytest.raises(ValueError, match="trust_remote_code=True"):
                build()


def test_quantization_config_is_passed_or_refused_like_trl(tokenizer, backbone, stage1, tmp_path):
    """`quantization_config` (the trainer argument) joins `model_init_kwargs` for a path, and setting it in both is
    TRL's error. (Quantized loading itself needs bitsandbytes and a GPU.)"""
    config = {"model_init_kwargs": {"quantization_config": {"load_in_4bit": True}}}
    message = "`quantization_config` both as a trainer argument"
    with pytest.raises(ValueError, match=message):
        trl_trainer(backbone, fresh(tokenizer), rows_of(8), tmp_path, config, quantization_config=object())
    for variant in ("micro", "stage2"):
        with pytest.raises(ValueError, match=message):
            micro_trainer(
                variant, backbone, stage1, fresh(tokenizer), rows_of(8), tmp_path, config, quantization_config=object()
            )


# -------------------------------------------------------------------------------------------------------- PEFT
def lora_targets(model) -> set[str]:
    """The module names (last part) that carry a LoRA adapter."""
    return {match.group(1) for name, _ in model.named_parameters() if (match := re.search(r"\.(\w+)\.lora_A\.", name))}


def changed(before: dict, model) -> set[str]:
    return {name for name, value in model.named_parameters() if name in before and not torch.equal(before[name], value)}


PEFT_CONFIGS = {
    "LoraConfig()": lambda: LoraConfig(),
    "LoraConfig(modules_to_save=['score']) (TRL's documentation)": lambda: LoraConfig(modules_to_save=["score"]),
    "LoraConfig(task_type='SEQ_CLS')": lambda: LoraConfig(task_type="SEQ_CLS"),
}


@pytest.mark.parametrize("peft_case", list(PEFT_CONFIGS))
def test_lora_defaults_train_like_trl(peft_case, tokenizer, backbone, stage1, tmp_path):
    """A `peft_config` with no `target_modules`: LoRA lands on the modules TRL targets for the backbone's type, and the
    heads and router train in full beside it (finding 1)."""
    control = trl_trainer(backbone, fresh(tokenizer), rows_of(8), tmp_path, peft_config=PEFT_CONFIGS[peft_case]())
    given = PEFT_CONFIGS[peft_case]()
    trainer = stage1_trainer(backbone, stage1, tokenizer, tmp_path, peft_config=given)
    assert given.target_modules is None  # the caller's config is left as it was
    assert lora_targets(trainer.model) == lora_targets(control.model) == {"q_proj", "v_proj"}
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any(".heads." in name for name in before) and any(".router." in name for name in before)
    trainer.train()
    trained = changed(before, trainer.model)
    assert any(".heads." in name for name in trained) and any(".router." in name for name in trained)
    assert any("lora_B" in name for name in trained)


def test_peft_model_as_model_trains_like_trl(tokenizer, backbone, stage1, tmp_path):
    """A `PeftModel` passed as `model` trains its adapter, as in TRL (finding 2). (What is refused: `REFUSALS`.)"""
    control_base = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    control = trl_trainer(get_peft_model(control_base, LoraConfig()), fresh(tokenizer), rows_of(8), tmp_path)
    micro = build_tiny_micro_model(tokenizer, num_heads=2)
    peft_model = get_peft_model(micro, prepare_peft_config(LoraConfig(), micro))
    trainer = stage1_trainer(peft_model, stage1, tokenizer, tmp_path)
    assert lora_targets(trainer.model) == lora_targets(control.model)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert {name for name in changed(before, trainer.model) if "lora_B" in name}


def scored(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_lora_run_reloads_from_its_folder(tokenizer, backbone, stage1, tmp_path, no_trl_micro):
    """A LoRA run's saved folder loads as a model, the adapter merged, with the scores it trained to: by
    `MiCRoRewardModel.from_pretrained(run)`, by `AutoModelForSequenceClassification` with `trust_remote_code=True` in
    a process without trl_micro, and after `python -m trl_micro.trainer.lora run merged`, as TRL's run reloads with
    PEFT's `AutoPeftModelForSequenceClassification` (finding 9). That PEFT class refuses a MiCRo run (its base class
    is outside PEFT's import allowlist)."""
    from peft import AutoPeftModelForSequenceClassification

    control = trl_trainer(
        backbone, fresh(tokenizer), rows_of(8), tmp_path, peft_config=LoraConfig(modules_to_save=["score"])
    )
    control.train()
    control.save_model(str(tmp_path / "trl_run"))
    trainer = stage1_trainer(
        backbone,
        stage1,
        tokenizer,
        tmp_path,
        {"model_card_pairs": 2},
        peft_config=LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["score"]),
    )
    trainer.train()
    run = tmp_path / "micro_run"
    trainer.save_model(str(run))

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trl_batch = control.data_collator([control.train_dataset[i] for i in range(4)])
    control.model.eval()
    trainer.model.eval()
    reloaded_control = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "trl_run"), num_labels=1)
    torch.testing.assert_close(scored(reloaded_control.eval(), trl_batch), scored(control.model, trl_batch))

    expected = scored(trainer.model, batch)
    torch.testing.assert_close(scored(MiCRoRewardModel.from_pretrained(run), batch), expected, rtol=1e-4, atol=1e-5)
    reward = MiCRoReward.from_pretrained(run)  # the GRPO / RLOO reward function loads the run as it is
    torch.testing.assert_close(scored(reward.model, batch), expected, rtol=1e-4, atol=1e-5)
    card = (run / "README.md").read_text()
    assert f"python -m trl_micro.trainer.lora {run.name} merged" in card and "merge_and_unload" not in card
    auto = AutoModelForSequenceClassification.from_pretrained(run, trust_remote_code=True)
    torch.testing.assert_close(scored(auto, batch), expected, rtol=1e-4, atol=1e-5)
    subprocess.run(
        [sys.executable, "-m", "trl_micro.trainer.lora", str(run), str(tmp_path / "merged")], check=True, cwd=REPO_ROOT
    )
    merged = MiCRoRewardModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(scored(merged, batch), expected, rtol=1e-4, atol=1e-5)
    remote = subprocess.run(
        [
            sys.executable,
            "-c",
            REMOTE_SCORE,
            str(run),
            json.dumps(batch["input_ids"].tolist()),
            json.dumps(batch["attention_mask"].tolist()),
        ],
        capture_output=True,
        text=True,
        env=no_trl_micro,
        cwd=tmp_path,
        timeout=300,
    )
    assert remote.returncode == 0, remote.stderr[-3000:]
    result = json.loads(remote.stdout.split("RESULT ")[-1])
    assert not result["trl_micro_loaded"]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="import allowlist"):
        AutoPeftModelForSequenceClassification.from_pretrained(str(run))


REMOTE_SCORE = """
import json, sys
import torch
from transformers import AutoModelForSequenceClassification
path, ids, mask = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), torch.tensor(json.loads(sys.argv[3]))
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, trust_remote_code=True)  # as TRL's GRPO
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask).logits
print("RESULT", json.dumps({"logits": logits.tolist(),
    "trl_micro_loaded": any(name.split(".")[0] == "trl_micro" for name in sys.modules)}))
"""


# --------------------------------------------------------------------------------------------- as documented
def python_block(markdown: str, heading: str) -> str:
    section = markdown.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_stage1_snippet_runs_as_written(tokenizer, backbone, tmp_path, monkeypatch):
    """The README's Stage 1 code, the Hub model id replaced by the tiny local backbone."""
    code = python_block((REPO_ROOT / "README.md").read_text(), "## Train a MiCRo reward model (Stage 1)")
    model_id = re.search(r'model="([^"]+)"', code).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRL_MICRO_CACHE", str(tmp_path / "cache"))
    exec(compile(code.replace(model_id, backbone), "README.md", "exec"), {"pairs": make_conflicting_pairs(16)})
    assert (tmp_path / "micro-rm" / "model.safetensors").exists()


def test_trls_documented_lora_example_runs_as_written(tokenizer, backbone, tmp_path, monkeypatch):
    """TRL's documented LoRA example (docs/source/reward_trainer.md, "Train adapters with PEFT") with MiCRo's trainer,
    the Hub model replaced by the tiny local backbone: then its folder reloads (finding 1, finding 9)."""
    monkeypatch.chdir(tmp_path)
    dataset = make_conflicting_pairs(16).remove_columns(["context", "taste"])
    trainer = MiCRoRewardTrainer(
        backbone,
        train_dataset=dataset,
        peft_config=LoraConfig(modules_to_save=["score"]),  # important to include the score head ...
    )
    trainer.train()
    trainer.save_model()
    assert isinstance(trainer.model, PeftModel)
    assert isinstance(MiCRoRewardModel.from_pretrained(tmp_path / "micro-reward"), MiCRoRewardModel)


# ------------------------------------------------------------------------------------------------------ refusals
@dataclass
class Setup:
    """What a refusal needs to build a trainer."""

    tokenizer: object
    backbone: str
    stage1: str
    tmp_path: object

    def micro(self, variant="micro", model=None, rows=None, config=None, **kwargs):
        model = model if model is not None else (self.stage1 if variant == "stage2" else self.backbone)
        rows = rows if rows is not None else rows_of(8)
        return micro_trainer(variant, model, model, fresh(self.tokenizer), rows, self.tmp_path, config, **kwargs)

    def peft_model(self, **lora):
        micro = build_tiny_micro_model(self.tokenizer, num_heads=2)
        return get_peft_model(micro, prepare_peft_config(LoraConfig(**lora), micro))


@dataclass(frozen=True)
class Refusal:
    """A setting MiCRo refuses at init: the error's type, and a quote that is in both its message and the docs'
    table (so the table shows the message users get)."""

    build: object  # (Setup) -> trainer; must raise
    error: type
    quote: str


REFUSALS = {
    "args: a plain RewardConfig": Refusal(
        lambda s: MiCRoRewardTrainer(
            s.backbone, args=RewardConfig(**common_args(s.tmp_path)), train_dataset=Dataset.from_list(rows_of(8))
        ),
        TypeError,
        "`args` must be a MiCRoRewardConfig",
    ),
    "model: another model class": Refusal(
        lambda s: s.micro(model=AutoModelForSequenceClassification.from_pretrained(s.backbone, num_labels=1)),
        TypeError,
        "`model` must be a MiCRoRewardModel, a PeftModel over one, or a path",
    ),
    "model: a PeftModel that does not save the heads and router": Refusal(
        lambda s: s.micro(
            model=get_peft_model(build_tiny_micro_model(s.tokenizer), LoraConfig(target_modules=["q_proj"]))
        ),
        ValueError,
        "does not train and save ['heads', 'router']",
    ),
    "model: a PeftModel with a peft_config": Refusal(
        lambda s: s.micro(model=s.peft_model(), peft_config=LoraConfig()),
        ValueError,
        "You passed a `PeftModel` together with a `peft_config`",
    ),
    "model: a PeftModel with freeze_backbone": Refusal(
        lambda s: s.micro("micro_frozen", model=s.peft_model()), ValueError, "its adapter lives in the backbone"
    ),
    "peft_config: prompt learning": Refusal(
        lambda s: s.micro(peft_config=PrefixTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS")),
        ValueError,
        "its virtual tokens move the prompt boundary the router reads",
    ),
    "peft_config: target_modules=['score'] alone": Refusal(
        lambda s: s.micro(peft_config=LoraConfig(target_modules=["score"])), ValueError, "names only the reward head"
    ),
    "peft_config: not a PeftConfig": Refusal(
        lambda s: s.micro(peft_config={"r": 4}), TypeError, "`peft_config` must be a `peft.PeftConfig` instance"
    ),
    "model_init_kwargs: num_labels=2": Refusal(
        lambda s: s.micro(config={"model_init_kwargs": {"num_labels": 2}}),
        ValueError,
        "`model_init_kwargs['num_labels']` must be 1",
    ),
    "chosen_ids with a context column": Refusal(
        lambda s: s.micro(rows=[{**row, "context": "x"} for row in pretokenized_rows(s.tokenizer)]),
        ValueError,
        "cannot be joined to token ids",
    ),
    "Stage 2: a backbone": Refusal(
        lambda s: s.micro("stage2", model=s.backbone), ValueError, "Router adaptation starts from a Stage 1 model"
    ),
    "Stage 2: a PeftModel": Refusal(
        lambda s: s.micro("stage2", model=s.peft_model()), ValueError, "merge the adapter first"
    ),
    "Stage 2: a peft_config": Refusal(
        lambda s: s.micro("stage2", peft_config=LoraConfig()), ValueError, "takes no `peft_config`"
    ),
    "Stage 2: a streaming dataset": Refusal(
        lambda s: s.micro("stage2", rows=Dataset.from_list(rows_of(8)).to_iterable_dataset()),
        TypeError,
        "materialize the IterableDataset",
    ),
    "Stage 2: pre-tokenized data": Refusal(
        lambda s: s.micro("stage2", rows=pretokenized_rows(s.tokenizer)), ValueError, "which token ids cannot take"
    ),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_name_the_setting_and_the_fix(name, tokenizer, backbone, stage1, tmp_path):
    """What MiCRo cannot do as TRL does is refused at init, with the message docs/trainer_parity.md quotes."""
    refusal = REFUSALS[name]
    with pytest.raises(refusal.error) as raised:
        refusal.build(Setup(tokenizer, backbone, stage1, tmp_path))
    assert refusal.quote in str(raised.value)
    assert refusal.quote in (REPO_ROOT / "docs" / "trainer_parity.md").read_text(), "the docs table lacks the message"


# ----------------------------------------------------------------------------------------------------- inventory
@dataclass(frozen=True)
class Feature:
    """How MiCRo takes one of TRL's reward-trainer features: `"same"` (as TRL does), `"refused"` (an error at init) or
    `"own"` (MiCRo's own meaning, documented); `tests` names the tests that check it."""

    support: str
    tests: tuple[str, ...] = ()


def same_as_trl(test: str, *names: str) -> dict[str, Feature]:
    """Rows for `names`, each handled as TRL handles it and checked by `test`."""
    return {name: Feature("same", (test,)) for name in names}


FEATURES = {
    "model": Feature("same", ("test_model_init_kwargs_are_all_honoured", "test_peft_model_as_model_trains_like_trl")),
    "eval_dataset": Feature(
        "same", ("test_logged_names_include_trls", "test_evaluate_streaming_datasets_after_training")
    ),
    "peft_config": Feature("same", ("test_lora_defaults_train_like_trl", "test_lora_run_reloads_from_its_folder")),
    "eos_token": Feature("same", ("test_token_ids_match_trl", "test_eos_token_scoring_from_ids_matches_training")),
    "default:learning_rate": Feature("own"),
    "default:logging_steps": Feature("same"),
    "default:gradient_checkpointing": Feature("same"),
    "default:bf16": Feature("own"),
    "column:margin": Feature("same", ("test_token_ids_match_trl", "test_loss_terms_and_metrics_match_trl")),
    "column:chosen_ids": Feature(
        "same", ("test_token_ids_match_trl", "test_pretokenized_prompt_lengths_and_legacy_warning")
    ),
    **same_as_trl("test_logged_names_include_trls", "args"),
    **same_as_trl("test_a_custom_collator_is_used", "data_collator"),
    **same_as_trl(
        "test_token_ids_match_trl",
        "train_dataset",
        "processing_class",
        "chat_template_path",
        "column:prompt",
        "column:chosen",
        "column:rejected",
        "column:rejected_ids",
        "column:rejected_input_ids",
        "column:chat_template_kwargs",
        "column:tools",
    ),
    **same_as_trl("test_compute_metrics_gets_trls_predictions", "compute_metrics"),
    **same_as_trl(
        "test_passthrough_arguments_work",
        "callbacks",
        "optimizers",
        "optimizer_cls_and_kwargs",
        "preprocess_logits_for_metrics",
        "disable_dropout",
        "dataset_num_proc",
        "max_length",
        "pad_to_multiple_of",
        "activation_offloading",
        "pad_token",
    ),
    **same_as_trl("test_quantization_config_is_passed_or_refused_like_trl", "quantization_config"),
    **same_as_trl("test_model_init_kwargs_are_all_honoured", "model_init_kwargs"),
    **same_as_trl("test_trust_remote_code_loads_a_backbone_as_trl_does", "trust_remote_code"),
    **same_as_trl("test_loss_terms_and_metrics_match_trl", "center_rewards_coefficient"),
    **same_as_trl("test_pretokenized_prompt_lengths_and_legacy_warning", "column:chosen_input_ids"),
}


def trl_inventory() -> set[str]:
    """What the installed TRL's reward trainer takes: arguments, RewardConfig's own fields and overridden defaults,
    and the dataset columns its preprocessing reads (from its source)."""
    arguments = set(inspect.signature(RewardTrainer.__init__).parameters) - {"self"}
    base = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments)}
    own = {f.name for f in dataclasses.fields(RewardConfig)} - set(base)
    defaults = {
        f"default:{f.name}"
        for f in dataclasses.fields(RewardConfig)
        if f.name in base and f.name not in ("output_dir",) and f.default != base[f.name].default
    }
    source = inspect.getsource(reward_trainer.RewardTrainer)
    columns = set(re.findall(r'example(?:\.get\(|\[)"(\w+)"', source))
    columns |= set(re.findall(r'"(\w+)" in (?:column_names|examples?\[0\])', inspect.getsource(reward_trainer)))
    columns |= set(re.findall(r'"(\w+)"', re.search(r"_signature_columns = \[(.*?)\]", source).group(1)))
    return arguments | own | defaults | {f"column:{name}" for name in columns}


def test_every_trl_feature_has_a_parity_row():
    """A TRL release that adds an argument, a config field, a default or a dataset column fails here until the
    feature gets a row (and a line in docs/trainer_parity.md)."""
    missing = sorted(trl_inventory() - set(FEATURES))
    assert not missing, (
        f"TRL {trl.__version__}'s RewardTrainer takes {missing}: add rows to FEATURES and the docs table"
    )
    tests = {name for name, value in globals().items() if name.startswith("test_") and callable(value)}
    for name, feature in FEATURES.items():
        assert feature.support in ("same", "refused", "own"), name
        assert set(feature.tests) <= tests, (name, set(feature.tests) - tests)


def test_docs_table_lists_every_feature():
    table = (REPO_ROOT / "docs" / "trainer_parity.md").read_text()
    for name in FEATURES:
        shown = name.split(":", 1)[-1]
        assert f"`{shown}`" in table, f"docs/trainer_parity.md has no row for `{shown}`"
    assert "trainer_parity.md" in (REPO_ROOT / "mkdocs.yml").read_text()


# ---------------------------------------------------------------------------------------- pass-through arguments
def test_passthrough_arguments_work(tokenizer, backbone, stage1, tmp_path):
    """What MiCRo hands to TRL's and transformers' code unchanged: compute_metrics, preprocess_logits_for_metrics,
    callbacks, optimizers / optimizer_cls_and_kwargs, disable_dropout, dataset_num_proc, max_length,
    pad_to_multiple_of, activation_offloading and the deprecated pad_token."""
    from transformers import TrainerCallback

    class Count(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            Count.steps += 1

    seen = {}

    def compute_metrics(prediction):
        seen["predictions"] = prediction.predictions
        return {"my_metric": 0.5}

    def preprocess(logits, labels):
        return logits[0] if isinstance(logits, tuple) else logits

    config = {
        "eval_strategy": "steps",
        "eval_steps": 2,
        "max_length": 40,
        "pad_to_multiple_of": 8,
        "dataset_num_proc": 1,
        "activation_offloading": False,
        "disable_dropout": True,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = stage1_trainer(
            backbone,
            stage1,
            tokenizer,
            tmp_path,
            {**config, "pad_token": "<pad>"},
            eval_dataset=Dataset.from_list(rows_of(4)),
            compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=preprocess,
            callbacks=[Count()],
            optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}),
        )
    assert all(len(c) <= 40 and len(r) <= 40 for c, r in token_rows(trainer))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[1] % 8 == 0
    trainer.train()
    assert Count.steps == 2 and isinstance(
        trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer, torch.optim.SGD
    )
    assert any("eval_my_metric" in entry for entry in trainer.state.log_history) and seen
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stage1_trainer(model, stage1, tokenizer, tmp_path, optimizers=(optimizer, None)).train()


def test_compute_metrics_gets_trls_predictions(tokenizer, backbone, stage1, tmp_path):
    """`compute_metrics` receives what it receives from TRL: the rewards, one per evaluated sequence."""
    received = {}

    def compute_metrics(prediction, name):
        received[name] = prediction.predictions
        return {"my_metric": 0.5}

    rows, evaluation = rows_of(8), rows_of(6)
    config = {"eval_strategy": "steps", "eval_steps": 2}
    trl_trainer_evaluating(
        backbone, tokenizer, rows, evaluation, tmp_path, config, compute_metrics=lambda p: compute_metrics(p, "trl")
    ).train()
    for variant in VARIANTS:
        trainer = micro_trainer(
            variant,
            backbone,
            stage1,
            fresh(tokenizer),
            rows,
            tmp_path,
            config,
            eval_dataset=Dataset.from_list(evaluation),
            compute_metrics=lambda p, v=variant: compute_metrics(p, v),
        )
        trainer.train()
        assert any("eval_my_metric" in entry for entry in trainer.state.log_history)
        assert type(received[variant]) is type(received["trl"]), variant
        assert received[variant].shape == received["trl"].shape, variant


def test_a_custom_collator_is_used(tokenizer, backbone, stage1, tmp_path, caplog):
    """A `data_collator` of your own batches the training rows, as in TRL (TRL's own collator here); on a frozen
    backbone the feature cache then stays off, with a warning, since that collator batches tokens."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    with caplog.at_level(logging.WARNING, logger="trl_micro"):
        trainer = micro_trainer(
            "micro_frozen", backbone, stage1, fresh(tokenizer), rows_of(8), tmp_path, data_collator=collator
        )
    assert trainer.data_collator is collator and "Feature cache off: the `data_collator` you passed" in caplog.text
    trainer.train()
    assert trainer.state.global_step == 2
