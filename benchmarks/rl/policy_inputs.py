"""
The policy and the prompts of the RL benchmarks (`rl_personalization` and `best_of_n`): the models `--models` names
and the training and held-out prompts, the context shown to the policy as the system message.
"""

from __future__ import annotations

import json
import os

import torch
from datasets import Dataset
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from trl_micro.bundled.prompts import synthetic_prompt_dataset
from trl_micro.bundled.synthetic import SyntheticPreferenceConfig, generate_synthetic_preferences
from trl_micro.scripts.rl_utils import show_context_to_policy
from trl_micro.testing_utils import build_tiny_backbone, build_tiny_tokenizer, tiny_backbone_config

CONTEXT_TEMPLATE = "{context}\n\n"  # MiCRoConfig's default: the context as the system message of a conversation


def load_models(args, scratch: str):
    """(policy path, policy tokenizer, reward backbone, reward tokenizer) for `--models`."""
    if args.models == "embedded":
        from trl_micro.bundled.embedded import embedded_model_path

        path = embedded_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        return path, tokenizer, AutoModel.from_pretrained(path, dtype=torch.float32), tokenizer
    data = generate_synthetic_preferences(
        SyntheticPreferenceConfig(num_subpopulations=args.num_contexts, num_pairs_per_subpopulation=50)
    )
    texts = [row[column] for row in data for column in ("prompt", "chosen", "rejected")]
    tokenizer = build_tiny_tokenizer(texts + sorted(set(data["context"])) + ["system user assistant"], vocab_size=800)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(tiny_backbone_config(tokenizer))
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    path = os.path.join(scratch, "tiny-policy")
    policy.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer, build_tiny_backbone(tokenizer, seed=1), tokenizer


def show_contexts(train: Dataset, evaluation: Dataset) -> tuple[Dataset, Dataset]:
    """Both prompt sets with the context joined to `prompt` as the system message; `query` keeps the bare prompt."""
    parts = []
    for part in (train, evaluation):
        if "query" not in part.column_names:
            part = part.add_column("query", part["prompt"])
        parts.append(show_context_to_policy(part, "context", CONTEXT_TEMPLATE))
    return tuple(parts)


def prompt_splits(num_contexts: int, eval_prompts: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) synthetic prompts, every prompt under every context, held out whole."""
    dataset = synthetic_prompt_dataset(num_contexts, conversational=True, seed=0)
    keys = [json.dumps(prompt) for prompt in dataset["prompt"]]
    held_out = set(list(dict.fromkeys(keys))[-eval_prompts:])
    train = dataset.select([index for index, key in enumerate(keys) if key not in held_out])
    evaluation = dataset.select([index for index, key in enumerate(keys) if key in held_out])
    return show_contexts(train, evaluation)


def first_queries(prompts: Dataset, num_queries: int) -> Dataset:
    """The rows of the first `num_queries` distinct queries (each under every context)."""
    keys = [json.dumps(query) for query in prompts["query"]]
    kept = set(list(dict.fromkeys(keys))[:num_queries])
    return prompts.select([index for index, key in enumerate(keys) if key in kept])


def dsp_prompts(pools: dict[str, Dataset], eval_prompts: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) prompts of DSP pools (`draw_dsp_pools`), the held-out ones of the first `eval_prompts` queries."""
    train, evaluation = show_contexts(pools["train_prompts"], pools["eval_prompts"])
    return train, first_queries(evaluation, eval_prompts)
