"""
Preference data for MiCRo: context joining and tokenization that keeps the prompt boundary, and the per-pair columns
a batch carries. The trainer's collator and sampler are in `trl_micro.trainer.data_collator`, the per-context splits
in `trl_micro.splits`.

Every sequence the model scores is `prompt (+ context) + completion (+ EOS)`; the router reads the hidden state at the
last prompt token, so each tokenized sequence carries `prompt_length`, the number of its leading tokens that belong to
the prompt. The prompt is tokenized the way it is tokenized inside the full text:

- conversational data: the prompt rendered with `add_generation_prompt=True` is a prefix of the rendered conversation;
- standard (plain text) data: BPE can merge tokens across the boundary, so `prompt_length` is the length of the
  common prefix of the prompt's ids and the full text's ids (the last token fully inside the prompt).

A context (a user description, a criterion, a persona) joins the prompt through `MiCRoConfig.context_template`: in
front of a standard prompt, or as the system message of a conversational one (merged in front of an existing one).

Conversational rows are rendered as TRL's reward trainer renders them: a row's `tools` (JSON text or a list of tool
schemas) and `chat_template_kwargs` (a dict) go to `apply_chat_template`. Pre-tokenized rows (`chosen_ids` /
`rejected_ids`, as TRL takes them) keep their ids; their prompt length is read from the ids (`prompt_length_from_ids`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import is_conversational
from trl.trainer.utils import pad

from .deprecation import moved_names
from .value_checks import is_real_number

Messages = list[dict[str, Any]]

TOKENIZED_COLUMNS = ("chosen_ids", "rejected_ids", "chosen_prompt_length", "rejected_prompt_length")
TRL_TOKENIZED_COLUMNS = ("chosen_ids", "rejected_ids")  # what TRL's reward trainer takes as pre-tokenized data
LEGACY_TOKENIZED_COLUMNS = ("chosen_input_ids", "rejected_input_ids")  # TRL's older names, renamed with a warning
# Per-pair values the collators pass through: `pair_num_tokens` (tokens of both sequences) rides along with cached
# features, which carry no attention mask to count them from.
PAIR_LABEL_COLUMNS = ("margin", "context_index", "latent_group", "pair_num_tokens")


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    length = 0
    for a, b in zip(ids, other_ids):
        if a != b:
            break
        length += 1
    return length


def assistant_header(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The text a chat template appends for `add_generation_prompt=True` (e.g. `<|im_start|>assistant\\n`)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    messages = [{"role": "user", "content": "x"}]
    with_header = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    without_header = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not with_header.startswith(without_header) or with_header == without_header:
        return None
    return with_header[len(without_header) :]


def completion_end_token_ids(tokenizer: PreTrainedTokenizerBase, conversational: bool) -> list[int] | None:
    """
    The ids that follow a completion's text in every sequence `encode_prompt_completion` makes: the EOS for standard
    text, the chat template's end of turn for conversations (e.g. `<|im_end|>\\n`). `None` when there is none.
    """
    if not conversational:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    sentinel = "trl-micro-completion-end"
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    if sentinel not in rendered:
        return None
    ending = rendered[rendered.rindex(sentinel) + len(sentinel) :]
    return tokenizer(ending, add_special_tokens=False)["input_ids"] or None


def marker_token_ids(tokenizer: PreTrainedTokenizerBase, marker: str | None) -> list[int] | None:
    if not marker:
        return None
    return tokenizer(marker, add_special_tokens=False)["input_ids"] or None


def chat_template_kwargs_of(example: dict[str, Any]) -> dict[str, Any]:
    """
    What TRL's reward trainer passes to `apply_chat_template` for a row: its `tools` (JSON text is decoded; `None`
    when the row has none) and the entries of its `chat_template_kwargs` dict (absent or `None`: none).
    """
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    extra = example.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise ValueError(
            f"`chat_template_kwargs` must be a dict of chat template arguments, got {type(extra).__name__} {extra!r}."
        )
    return {"tools": tools, **extra}


def find_last(ids: Sequence[int], pattern: Sequence[int], end: int | None = None) -> int | None:
    """The index just past the last occurrence of `pattern` in `ids[:end]`, or `None`."""
    end = len(ids) if end is None else end
    width = len(pattern)
    for stop in range(end, width - 1, -1):
        if list(ids[stop - width : stop]) == list(pattern):
            return stop
    return None


def prompt_length_from_ids(chosen_ids: Sequence[int], rejected_ids: Sequence[int], marker_ids: Sequence[int] | None):
    """
    (chosen_prompt_length, rejected_prompt_length) of a pre-tokenized pair: the ids both sequences share, cut after
    the last `marker_ids` inside them when the marker is there (so a response that starts like the other one does not
    leak into the prompt), and kept between 1 and each sequence's length minus one (at least one prompt token for the
    router, at least one response token for the heads).
    """
    length = common_prefix_length(list(chosen_ids), list(rejected_ids))
    if marker_ids:
        length = find_last(chosen_ids, marker_ids, end=length) or length
    return tuple(max(1, min(length, len(ids) - 1)) for ids in (chosen_ids, rejected_ids))


def completion_end_of_ids(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[int] | None:
    """
    The ending `ids` show, among those `completion_end_token_ids` knows (the chat template's end of turn, the EOS):
    what a pre-tokenized training sequence ends with, so that scoring full texts completes them alike. `None` when
    it ends with neither.
    """
    candidates = []
    if getattr(tokenizer, "chat_template", None) is not None:
        candidates.append(completion_end_token_ids(tokenizer, conversational=True))
    candidates.append(completion_end_token_ids(tokenizer, conversational=False))
    for ending in candidates:
        if ending and list(ids[-len(ending) :]) == list(ending):
            return list(ending)
    return None


def join_context(
    prompt: str | Messages, context: str | None, context_template: str, skip_if_present: bool = False
) -> str | Messages:
    """
    Put `context` into `prompt` (see the module docstring). `None` or empty context leaves the prompt unchanged, and so
    does, with `skip_if_present`, a prompt that already starts with the joined context (a policy prompt that shows
    its context, read by a reward that would otherwise join it twice).
    """
    if context is None or not str(context).strip():
        return prompt
    text = context_template.format(context=context)
    if isinstance(prompt, str):
        return prompt if skip_if_present and prompt.startswith(text) else text + prompt
    system = text.strip()
    if prompt and prompt[0].get("role") == "system":
        if skip_if_present and str(prompt[0].get("content", "")).startswith(system):
            return prompt
        return [{"role": "system", "content": f"{system}\n\n{prompt[0]['content']}"}, *prompt[1:]]
    return [{"role": "system", "content": system}, *prompt]


def _content_is_empty(value: str | Messages) -> bool:
    """Empty text, or messages none of which has content or tool calls (an assistant turn may be tool calls alone)."""
    if isinstance(value, str):
        return not value.strip()
    return not value or all(
        not str(message.get("content") or "").strip() and not message.get("tool_calls") for message in value
    )


def encode_prompt_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Messages,
    completion: str | Messages,
    add_eos: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[int], int]:
    """
    Token ids of `prompt + completion` and the number of leading ids that belong to the prompt.

    Standard text gets the tokenizer's EOS appended (as TRL's reward trainer does) unless it already ends with it;
    conversational text ends the way the chat template ends a turn, rendered with `chat_template_kwargs` (a row's
    tools and template arguments, `chat_template_kwargs_of`; ignored for standard text, as in TRL).
    """
    if isinstance(prompt, list) != isinstance(completion, list):
        raise ValueError("prompt and completion must both be text or both be lists of messages.")
    if isinstance(prompt, list):
        template_kwargs = chat_template_kwargs or {}
        prompt_ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_dict=True, **template_kwargs
        )["input_ids"]
        full_ids = tokenizer.apply_chat_template(prompt + completion, return_dict=True, **template_kwargs)["input_ids"]
    else:
        text = prompt + completion
        if add_eos and tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
            text += tokenizer.eos_token
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(text)["input_ids"]
    return list(full_ids), common_prefix_length(prompt_ids, full_ids)


def split_implicit_prompt(chosen: str | Messages, rejected: str | Messages, marker: str | None = None):
    """
    Split a pair whose prompt is implicit (inside both texts) into (prompt, chosen, rejected).

    Conversations: the prompt is every turn before the final assistant turn. Text: the longest common prefix, cut after
    the last `marker` inside it when a marker is given (so a response that starts with the same words as the other one
    does not leak into the prompt).
    """
    if isinstance(chosen, list):
        if not chosen or not rejected or chosen[:-1] != rejected[:-1]:
            raise ValueError("chosen and rejected conversations must share every turn but the last.")
        return chosen[:-1], chosen[-1:], rejected[-1:]
    length = common_prefix_length(list(chosen), list(rejected))
    if marker and marker in chosen[:length]:
        length = chosen[:length].rindex(marker) + len(marker)
    return chosen[:length], chosen[length:], rejected[length:]


def tokenize_preference_example(
    example: dict[str, Any],
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    context_template: str,
    context_column: str | None,
    prompt_marker: str | None = None,
) -> dict[str, Any]:
    """
    One preference example -> `chosen_ids`, `rejected_ids` and their prompt lengths. Conversations are rendered with
    the row's `tools` and `chat_template_kwargs` (`chat_template_kwargs_of`). Raises, naming the row and the column, on
    a value that is neither text nor a list of messages, on empty texts, and on an implicit-prompt pair whose two texts
    are identical (there is no response to split off).
    """
    chosen, rejected = example["chosen"], example["rejected"]
    has_prompt = "prompt" in example and example["prompt"] is not None
    for column in ("prompt", "chosen", "rejected") if has_prompt else ("chosen", "rejected"):
        if not isinstance(example[column], (str, list)):
            raise ValueError(
                f"Row {index}: `{column}` must be text or a list of chat messages, got "
                f"{type(example[column]).__name__} {example[column]!r}. Fix the column or drop this row."
            )
    if has_prompt:
        prompt = example["prompt"]
        if is_conversational({"chosen": chosen}) and not isinstance(prompt, list):
            raise ValueError(f"Row {index}: `prompt` is text but `chosen` is a conversation; use one format.")
    else:
        if chosen == rejected:
            raise ValueError(
                f"Row {index}: `chosen` and `rejected` are identical, so there is no response to tell from the "
                "implicit prompt (and no preference). Drop this row."
            )
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, prompt_marker)
    for column, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None or _content_is_empty(value):
            raise ValueError(
                f"Row {index}: `{column}` is empty. Every pair needs two non-empty responses; drop or fix this row."
            )
    if prompt is None or _content_is_empty(prompt):
        raise ValueError(f"Row {index}: `prompt` is empty. The router reads the prompt; drop or fix this row.")
    if context_column is not None:
        prompt = join_context(prompt, example.get(context_column), context_template)
    try:
        template_kwargs = chat_template_kwargs_of(example)
    except (ValueError, json.JSONDecodeError) as error:
        raise ValueError(f"Row {index}: {error} Fix the `tools` / `chat_template_kwargs` column.") from None
    chosen_ids, chosen_prompt_length = encode_prompt_completion(tokenizer, prompt, chosen, True, template_kwargs)
    rejected_ids, rejected_prompt_length = encode_prompt_completion(tokenizer, prompt, rejected, True, template_kwargs)
    return {
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "chosen_prompt_length": chosen_prompt_length,
        "rejected_prompt_length": rejected_prompt_length,
    }


def add_prompt_lengths(example: dict[str, Any], marker_ids: list[int] | None) -> dict[str, Any]:
    """A pre-tokenized pair's `chosen_prompt_length` and `rejected_prompt_length` (`prompt_length_from_ids`)."""
    chosen, rejected = prompt_length_from_ids(example["chosen_ids"], example["rejected_ids"], marker_ids)
    return {"chosen_prompt_length": chosen, "rejected_prompt_length": rejected}


def check_preference_columns(column_names: list[str], dataset_name: str = "train") -> None:
    missing = [column for column in ("chosen", "rejected") if column not in column_names]
    if missing:
        raise ValueError(
            f"The {dataset_name} dataset is missing the column(s) {missing}; it has {sorted(column_names)}. "
            "MiCRo trains on preference pairs: `chosen` and `rejected` (with an optional `prompt`), as text or "
            "as lists of chat messages, or on pre-tokenized `chosen_ids` and `rejected_ids`."
        )


def pad_right(sequences: Sequence[Sequence[int]], padding_value: int) -> torch.Tensor:
    """Right-padded (rows, longest) long tensor of token id lists (TRL's `pad`)."""
    return pad([torch.tensor(sequence, dtype=torch.long) for sequence in sequences], padding_value, "right")


def tokenize_pairs(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    context_template: str,
    context_column: str | None,
    prompt_marker: str | None = None,
    desc: str | None = None,
) -> Dataset:
    """Token ids and prompt lengths (`TOKENIZED_COLUMNS`) of every pair, `context_column` joined (None: no context)."""
    return dataset.map(
        tokenize_preference_example,
        with_indices=True,
        fn_kwargs={
            "tokenizer": tokenizer,
            "context_template": context_template,
            "context_column": context_column,
            "prompt_marker": prompt_marker,
        },
        remove_columns=dataset.column_names,
        desc=desc or ("Tokenizing pairs" + (" with their context" if context_column else "")),
    )


def context_indices(contexts: Sequence[str]) -> list[int]:
    """The `context_index` column of rows with these contexts: each context's rank among the distinct ones, sorted."""
    ids = {context: index for index, context in enumerate(sorted(set(contexts)))}
    return [ids[context] for context in contexts]


def check_margins(margins: Iterable, source: str = "the train dataset") -> None:
    """Every value of a `margin` column must be a finite number; the error names the first row that is not."""
    for row, margin in enumerate(margins):
        if not is_real_number(margin) or not np.isfinite(margin):
            raise ValueError(
                f"Row {row} of {source}: `margin` is {type(margin).__name__} {margin!r}; the "
                "`margin` column holds a finite number for every pair (how much `chosen` is preferred). Fill it in, "
                "or remove the column to train without margins."
            )


def pair_labels(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The per-pair values a batch carries besides the sequences: `margin` (float), `context_index`, `latent_group`
    and `pair_num_tokens` (int)."""
    labels = {}
    if "margin" in examples[0]:
        check_margins([example["margin"] for example in examples], "a batch")
        labels["margin"] = torch.tensor([example["margin"] for example in examples], dtype=torch.float)
    for column in ("context_index", "latent_group", "pair_num_tokens"):
        if column in examples[0]:
            labels[column] = torch.tensor([example[column] for example in examples], dtype=torch.long)
    return labels


__getattr__ = moved_names(
    __name__,
    {
        **dict.fromkeys(
            ("latent_groups", "user_latent_groups", "GroupedBatchSampler", "MiCRoPreferenceCollator"),
            "trl_micro.trainer.data_collator",
        ),
        **dict.fromkeys(
            ("split_by_context", "take_per_context", "hold_out_per_context", "DEFAULT_SPLIT_FRACTIONS", "SPLIT_NAMES"),
            "trl_micro.splits",
        ),
    },
)
