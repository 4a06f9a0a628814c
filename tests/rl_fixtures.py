"""Tiny models for the RL tests: a trained MiCRo reward checkpoint, a tiny policy, and prompt datasets with contexts."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from trl_micro import MiCRoReward, MiCRoRewardConfig, MiCRoRewardTrainer
from trl_micro.data_utils import assistant_header, completion_end_token_ids, marker_token_ids
from trl_micro.testing_utils import build_tiny_micro_model, tiny_backbone_config

from .conftest import CONTEXTS, make_conflicting_pairs

CONTEXT_IDS = {"short": "short-reader", "long": "long-reader"}
# Command-line flags of a short RL run on the CPU (nothing saved or reported, every step logged), and the sizes of a
# tiny GRPO / RLOO run (two steps of one group of four completions of at most eight tokens).
CPU_FLAGS = ["--use_cpu", "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1"]
TINY_GRPO_FLAGS = ["--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8"]
TINY_GRPO_FLAGS += ["--max_steps", "2"]


def train_reward_checkpoint(tokenizer, path, conversational: bool = True, num_heads: int = 2) -> str:
    """Stage 1 on the short-vs-long conflicting pairs; the saved model routes by the context in the prompt."""
    model = build_tiny_micro_model(tokenizer, num_heads=num_heads, seed=0)
    args = MiCRoRewardConfig(
        output_dir=str(path / "run"),
        per_device_train_batch_size=16,
        num_train_epochs=4,
        activation_checkpointing=False,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        num_heads=num_heads,
        use_cpu=True,
        bf16=False,
    )
    data = make_conflicting_pairs(64, seed=0, conversational=conversational)
    trainer = MiCRoRewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(path))
    return str(path)


def reward_with_eval_stores(checkpoint, folder, user_column: str) -> MiCRoReward:
    """The reward of `checkpoint` (no context column) routed per user of `user_column` by the stores `trl-micro eval`
    saves in `folder` (online_router.json and residual_heads.json)."""
    return MiCRoReward.from_pretrained(
        checkpoint,
        context_column=None,
        user_column=user_column,
        online_router=folder / "online_router.json",
        residual_heads=folder / "residual_heads.json",
    )


def save_tiny_policy(tokenizer, path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(tiny_backbone_config(tokenizer, "llama"))
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def prompt_dataset(num_prompts: int = 8, conversational: bool = True) -> Dataset:
    """Each prompt under both contexts (short / long readers), with `context` and `context_id` columns."""
    rows = []
    for i in range(num_prompts):
        for taste in ("short", "long"):
            text = f"Question number {i}: how do I cook rice?"
            prompt = [{"role": "user", "content": text}] if conversational else text + "\n"
            rows.append({"prompt": prompt, "context": CONTEXTS[taste], "context_id": CONTEXT_IDS[taste]})
    return Dataset.from_list(rows)


def save_untrained_micro(tokenizer, path, conversational=True, num_heads=2, **config_kwargs):
    """A random MiCRo model whose config knows the prompt marker and completion ending, as a trained one does;
    `config_kwargs` are other MiCRoConfig fields (a readout)."""
    model = build_tiny_micro_model(tokenizer, num_heads=num_heads, seed=3, **config_kwargs)
    marker = assistant_header(tokenizer) if conversational else "\n\nAssistant:"
    model.config.prompt_marker = marker
    model.config.prompt_marker_ids = marker_token_ids(tokenizer, marker)
    model.config.completion_end_ids = completion_end_token_ids(tokenizer, conversational)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def reward_checkpoint(tokenizer, tmp_path_factory):
    return train_reward_checkpoint(tokenizer, tmp_path_factory.mktemp("micro-rm"))


@pytest.fixture(scope="session")
def policy_path(tokenizer, tmp_path_factory):
    return save_tiny_policy(tokenizer, tmp_path_factory.mktemp("policy"))
