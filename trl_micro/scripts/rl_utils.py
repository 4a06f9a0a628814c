"""
What the personalized RL scripts (`trl-micro grpo | rloo | ppo`) share: their prompt-dataset arguments, loading the
prompts (a built-in prompt set, a local file / directory or a Hub dataset) with the context shown to the policy, LoRA
by default, the probe that scores a policy's samples per context before and after training, and the run's log file.

With `show_context_to_policy`, the context joins the prompt the policy reads (the system message of a conversation,
or text in front of a plain prompt, through the reward model's context template), so the policy can tell the users
apart; the reward model then reads it from the prompt once, not twice (see `trl_micro.rewards`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..bundled.catalog import load_named_dataset
from ..bundled.prompts import SYNTHETIC_NAMES, synthetic_prompt_dataset
from ..data_utils import join_context
from ..rewards import MiCRoReward

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RUN_LOG = "personalized_rewards.json"


@dataclass
class PromptDatasetArguments:
    """
    Where the prompts come from (the recipes' dataset arguments).

    Args:
        prompt_dataset: `"synthetic"`, a local file / directory or a Hub dataset id.
        prompt_config: config of a Hub dataset (`datasets.load_dataset(prompt_dataset, prompt_config)`).
        prompt_split: split of a dataset with several.
        context_column: column with each prompt's context.
        show_context_to_policy: join the context to the prompt the policy reads.
        num_subpopulations: synthetic only: how many subpopulations (contexts).
        num_prompts: synthetic only: distinct prompts per context (all 240 when unset).
        conversational: synthetic only: chat messages instead of plain text.
        prompt_seed: synthetic only: seed of the prompt sample.
    """

    prompt_dataset: str = field(
        default="synthetic", metadata={"help": "'synthetic', a local file or directory, or a Hub dataset id."}
    )
    prompt_config: str | None = field(default=None, metadata={"help": "Config of a Hub prompt dataset."})
    prompt_split: str = field(default="train", metadata={"help": "Split of a dataset with several."})
    context_column: str = field(default="context", metadata={"help": "Column with each prompt's context."})
    show_context_to_policy: bool = field(
        default=True, metadata={"help": "Join the context to the prompt the policy reads (as its system message)."}
    )
    num_subpopulations: int = field(default=2, metadata={"help": "Synthetic: number of contexts."})
    num_prompts: int | None = field(default=None, metadata={"help": "Synthetic: distinct prompts per context."})
    conversational: bool = field(default=True, metadata={"help": "Synthetic: chat messages instead of plain text."})
    prompt_seed: int = field(default=0, metadata={"help": "Synthetic: seed of the prompt sample."})


@dataclass
class PersonalizedRLArguments(PromptDatasetArguments):
    """
    [`PromptDatasetArguments`] plus the following (the MiCRo checkpoint is `--reward_model_path`, a field of
    PPOConfig and of the GRPO recipe's arguments):

    Args:
        full_finetune: train every weight of the policy instead of a LoRA adapter (the default; LoRA options as in
            TRL's `ModelConfig`: `--lora_r`, `--lora_target_modules`, ...).
        probe_prompts: prompts per context held out of training and scored before and after it (0: no probe;
            single-process runs only).
        probe_max_new_tokens: completion length of the probe.
        group_column: column naming each prompt's context in logs and probes (`context_id`; the context column when
            the dataset has no such column).
    """

    full_finetune: bool = field(default=False, metadata={"help": "Train all policy weights instead of LoRA."})
    probe_prompts: int = field(default=0, metadata={"help": "Held-out prompts per context, probed before/after."})
    probe_max_new_tokens: int = field(default=48, metadata={"help": "Completion length of the probe."})
    group_column: str = field(default="context_id", metadata={"help": "Column naming each prompt's context."})


def load_prompt_dataset(args: PromptDatasetArguments, context_template: str = "{context}\n\n") -> Dataset:
    """The prompts `args` describe, checked for `prompt` and the context column, the context shown if asked."""
    if args.prompt_dataset in SYNTHETIC_NAMES:
        dataset = synthetic_prompt_dataset(
            args.num_subpopulations, args.num_prompts, args.conversational, args.prompt_seed
        )
    else:
        splits = load_named_dataset(args.prompt_dataset, args.prompt_config)
        if args.prompt_split not in splits:
            raise ValueError(
                f"The prompt dataset {args.prompt_dataset!r} has no split {args.prompt_split!r}: {list(splits)}."
            )
        dataset = splits[args.prompt_split]
    missing = [column for column in ("prompt", args.context_column) if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The prompt dataset {args.prompt_dataset!r} has no column(s) {missing} (it has {dataset.column_names}). "
            "It needs `prompt` and a context column (`--context_column`)."
        )
    if args.show_context_to_policy:
        dataset = show_context_to_policy(dataset, args.context_column, context_template)
    return dataset


def default_to_lora(script_args: PersonalizedRLArguments, model_args) -> None:
    """Unless `--full_finetune`, train a LoRA adapter of the policy (TRL's `ModelConfig` options; default targets)."""
    if not script_args.full_finetune:
        model_args.use_peft = True
        model_args.lora_target_modules = model_args.lora_target_modules or DEFAULT_LORA_TARGETS


def save_run_log(trainer, output_dir: str, probes: dict) -> None:
    """`<output_dir>/personalized_rewards.json`: the trainer's log history and the probes (main process only)."""
    if not trainer.accelerator.is_main_process:
        return
    with open(os.path.join(output_dir, RUN_LOG), "w") as file:
        json.dump({"log_history": trainer.state.log_history, "probe": probes}, file, indent=1)
    if probes:
        trainer.accelerator.print(f"Mean reward per context on held-out prompts: {json.dumps(probes)}")


def end_run(trainer) -> None:
    """
    Close a finished run on every rank together. A rank that tears the process group (gloo) down while its peer is
    still saving makes the peer abort ("terminate called without an active exception") after a finished run.
    """
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def show_context_to_policy(dataset: Dataset, context_column: str, context_template: str) -> Dataset:
    """Join each row's context to its prompt (rows without a context keep their prompt)."""

    def join(example):
        return {"prompt": join_context(example["prompt"], example[context_column], context_template)}

    return dataset.map(join, desc="Showing the context to the policy")


@torch.no_grad()
def sample_completions(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    return_lengths: bool = False,
    **generation_kwargs,
) -> list | tuple[list, list[int], list[bool]]:
    """
    One sampled completion per prompt (text, or `[{"role": "assistant", ...}]` for a conversational prompt), in the
    prompts' order. Sampling uses the policy's generation config, overridden by `generation_kwargs` (`temperature`,
    `top_k`, ...); seed torch's generator first for a reproducible draw. The policy's train / eval mode is restored.
    With `return_lengths`, also each completion's number of generated tokens (its end-of-sequence token included) and
    whether it was cut at `max_new_tokens` (it ends without an end-of-sequence token).
    """
    was_training = policy.training
    policy.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos = policy.generation_config.eos_token_id
    eos_ids = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
    completions, lengths, capped = [], [], []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            conversational = isinstance(batch[0], list)
            texts = (
                [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch]
                if conversational
                else batch
            )
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not conversational)
            inputs = inputs.to(policy.device)
            output = policy.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, **generation_kwargs)
            generated = output[:, inputs["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
            completions += [[{"role": "assistant", "content": text}] if conversational else text for text in decoded]
            ended = torch.isin(generated.cpu(), eos_ids)  # (B, T): an end-of-sequence token at that step
            first_end = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, generated.shape[1])
            lengths += first_end.tolist()
            capped += (~ended.any(dim=1)).tolist()
    finally:
        tokenizer.padding_side = padding_side
        policy.train(was_training)
    return (completions, lengths, capped) if return_lengths else completions


@torch.no_grad()
def reward_per_context(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reward: MiCRoReward,
    prompts: Dataset,
    group_column: str = "context_id",
    max_new_tokens: int = 48,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """
    Mean reward of one sampled completion per row of `prompts` (a prompt dataset as the recipes build it: `prompt`
    already showing the context, and `group_column`), per group; the reward's per-user state applies to the rows of
    its `user_column`. Sampling uses the policy's generation config.
    """
    torch.manual_seed(seed)
    completions = sample_completions(policy, tokenizer, prompts["prompt"], max_new_tokens, batch_size)
    users = prompts[reward.user_column] if reward.user_column in prompts.column_names else None
    rewards = reward.score(prompts["prompt"], completions, users=users)["rewards"].tolist()
    totals: dict[str, list[float]] = {}
    for group, value in zip(prompts[group_column], rewards):
        totals.setdefault(str(group), []).append(value)
    return {group: sum(values) / len(values) for group, values in sorted(totals.items())}
