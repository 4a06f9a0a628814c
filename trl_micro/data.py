"""
Preference data for MiCRo: context joining, tokenization that keeps the prompt boundary, and the collator.

Every sequence the model scores is `prompt (+ context) + completion (+ EOS)`; the router reads the hidden state at the
last prompt token, so each tokenized sequence carries `prompt_length`, the number of its leading tokens that belong to
the prompt. The prompt is tokenized the way it is tokenized inside the full text:

- conversational data: the prompt rendered with `add_generation_prompt=True` is a prefix of the rendered conversation;
- standard (plain text) data: BPE can merge tokens across the boundary, so `prompt_length` is the length of the
  common prefix of the prompt's ids and the full text's ids (the last token fully inside the prompt).

A context (a user description, a criterion, a persona) joins the prompt through `MiCRoConfig.context_template`: in
front of a standard prompt, or as the system message of a conversational one (merged in front of an existing one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from trl.data_utils import is_conversational

Messages = list[dict[str, Any]]


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


def join_context(prompt: str | Messages, context: str | None, context_template: str) -> str | Messages:
    """Put `context` into `prompt` (see the module docstring). `None` or empty context leaves the prompt unchanged."""
    if context is None or not str(context).strip():
        return prompt
    text = context_template.format(context=context)
    if isinstance(prompt, str):
        return text + prompt
    system = text.strip()
    if prompt and prompt[0].get("role") == "system":
        return [{"role": "system", "content": f"{system}\n\n{prompt[0]['content']}"}, *prompt[1:]]
    return [{"role": "system", "content": system}, *prompt]


def _content_is_empty(value: str | Messages) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not value or all(not str(message.get("content") or "").strip() for message in value)


def encode_prompt_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, completion: str | Messages, add_eos: bool = True
) -> tuple[list[int], int]:
    """
    Token ids of `prompt + completion` and the number of leading ids that belong to the prompt.

    Standard text gets the tokenizer's EOS appended (as TRL's reward trainer does) unless it already ends with it;
    conversational text ends the way the chat template ends a turn.
    """
    if isinstance(prompt, list) != isinstance(completion, list):
        raise ValueError("prompt and completion must both be text or both be lists of messages.")
    if isinstance(prompt, list):
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        full_ids = tokenizer.apply_chat_template(prompt + completion, return_dict=True)["input_ids"]
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
    """One preference example -> `chosen_ids`, `rejected_ids` and their prompt lengths. Raises on empty texts."""
    chosen, rejected = example["chosen"], example["rejected"]
    if "prompt" in example and example["prompt"] is not None:
        prompt = example["prompt"]
        if is_conversational({"chosen": chosen}) and not isinstance(prompt, list):
            raise ValueError(f"Row {index}: `prompt` is text but `chosen` is a conversation; use one format.")
    else:
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
    chosen_ids, chosen_prompt_length = encode_prompt_completion(tokenizer, prompt, chosen)
    rejected_ids, rejected_prompt_length = encode_prompt_completion(tokenizer, prompt, rejected)
    return {
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "chosen_prompt_length": chosen_prompt_length,
        "rejected_prompt_length": rejected_prompt_length,
    }


def check_preference_columns(column_names: list[str], dataset_name: str = "train") -> None:
    missing = [column for column in ("chosen", "rejected") if column not in column_names]
    if missing:
        raise ValueError(
            f"The {dataset_name} dataset is missing the column(s) {missing}; it has {sorted(column_names)}. "
            "MiCRo trains on preference pairs: `chosen` and `rejected` (with an optional `prompt`), as text or "
            "as lists of chat messages."
        )


def pad_right(sequences: list[list[int]], padding_value: int, pad_to_multiple_of: int | None = None) -> torch.Tensor:
    length = max(len(sequence) for sequence in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(sequences), length), padding_value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return out


def context_indices(contexts: Sequence[str]) -> list[int]:
    """The `context_index` column of rows with these contexts: each context's rank among the distinct ones, sorted."""
    ids = {context: index for index, context in enumerate(sorted(set(contexts)))}
    return [ids[context] for context in contexts]


def pair_labels(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The per-pair values a batch carries besides the sequences: `margin` (float) and `context_index` (int)."""
    labels = {}
    if "margin" in examples[0]:
        labels["margin"] = torch.tensor([example["margin"] for example in examples], dtype=torch.float)
    if "context_index" in examples[0]:
        labels["context_index"] = torch.tensor([example["context_index"] for example in examples], dtype=torch.long)
    return labels


@dataclass
class MiCRoPreferenceCollator:
    """
    Batches tokenized pairs: rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones (TRL's layout),
    right-padded, with `prompt_lengths` for every row and `margin` / `context_index` when the data has them.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [example["chosen_ids"] for example in examples] + [example["rejected_ids"] for example in examples]
        prompt_lengths = [example["chosen_prompt_length"] for example in examples] + [
            example["rejected_prompt_length"] for example in examples
        ]
        batch = {
            "input_ids": pad_right(sequences, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": pad_right([[1] * len(s) for s in sequences], 0, self.pad_to_multiple_of),
            "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long),
        }
        batch.update(pair_labels(examples))
        return batch
