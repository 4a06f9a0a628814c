r"""
`trl-micro ppo`: train a policy with PPO on a MiCRo personalized reward (TRL 1.12: PPOTrainer left TRL in 1.13).

The context of each prompt (a user description) is its system message, so the query PPO generates from carries it,
and the MiCRo reward model routes on it (`trl_micro.ppo_reward`). The policy is LoRA-tuned by default; the value model
is the policy's backbone with a fresh one-label head.

    pip install 'trl-micro[ppo]'      # or: make .venv-ppo/.installed, then use .venv-ppo/bin/trl-micro
    trl-micro ppo --reward_model_path outputs/micro-rm --output_dir outputs/ppo-personalized

DeepSpeed: `trl-micro ppo --accelerate_config zero2 ...` (on CPU add `--num_processes 2 --mixed_precision no` with
`ACCELERATE_USE_CPU=true`, and `--ddp_backend gloo --bf16 false`). Without `--model_name_or_path`, the policy is the
embedded SmolLM2-135M-Instruct, whose tokenizer the reward model must share (PPO hands token ids to the reward model).
With `--probe_prompts N`, the mean reward per context of N held-out prompts is measured before and after training.
"""

from __future__ import annotations

import os
import sys

import trl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from ..bundled.catalog import EMBEDDED_MODEL, resolve_model_path
from ..ppo_reward import MiCRoRewardForPPO
from ..rewards import MiCRoReward
from ..splits import hold_out_per_context
from .rl_utils import (
    PersonalizedRLArguments,
    default_to_lora,
    end_run,
    load_prompt_dataset,
    reward_per_context,
    save_run_log,
)

PPO_INSTALL_HINT = (
    "PPO needs TRL 1.12 (PPOTrainer was removed in TRL 1.13; this environment has trl {version}). Install the PPO "
    "extra in its own environment: `pip install 'trl-micro[ppo]'` (pins trl>=1.12,<1.13), or "
    "`make .venv-ppo/.installed` and run with .venv-ppo/bin/python or .venv-ppo/bin/accelerate."
)


def ppo_classes():
    """(PPOConfig, PPOTrainer) of TRL 1.12; on newer TRL, exits with how to install the `ppo` extra."""
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError:
        sys.exit(PPO_INSTALL_HINT.format(version=trl.__version__))
    return PPOConfig, PPOTrainer


def tokenize_queries(dataset, tokenizer):
    """PPO's queries: the prompt (context included) rendered with the assistant header, as input_ids only."""

    def tokenize(example):
        prompt = example["prompt"]
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        return {"input_ids": ids}

    return dataset.map(tokenize, remove_columns=dataset.column_names, desc="Tokenizing queries")


def check_same_tokenizer(policy_tokenizer, reward_path):
    reward_tokenizer = AutoTokenizer.from_pretrained(reward_path)
    if reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise ValueError(
            f"PPO hands the policy's token ids to the reward model, but the tokenizer of {reward_path} differs from "
            "the policy's. Train the MiCRo reward model on a backbone of the policy's family (same tokenizer)."
        )
    return reward_tokenizer


def main(script_args: PersonalizedRLArguments, training_args, model_args: ModelConfig):
    PPOConfig, PPOTrainer = ppo_classes()
    if training_args.reward_model_path == PPOConfig.reward_model_path:  # PPOConfig's default, a plain model
        raise ValueError("--reward_model_path is required: a MiCRo reward checkpoint (local path or Hub id).")
    reward_path = resolve_model_path(training_args.reward_model_path, download=True)
    if not os.path.isdir(reward_path):
        raise ValueError(f"--reward_model_path must be a MiCRo reward checkpoint, got {reward_path!r}.")
    if not script_args.show_context_to_policy:
        raise ValueError("PPO's reward model reads the context from the query: keep --show_context_to_policy true.")
    policy_path = resolve_model_path(model_args.model_name_or_path or EMBEDDED_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    reward_tokenizer = check_same_tokenizer(tokenizer, reward_path)
    reward_model = MiCRoRewardForPPO.from_pretrained(reward_path)

    dataset = load_prompt_dataset(script_args, reward_model.config.context_template)
    group_column = script_args.group_column
    if group_column not in dataset.column_names:
        group_column = script_args.context_column
    train_prompts, probe_prompts = hold_out_per_context(dataset, script_args.probe_prompts, group_column)
    if probe_prompts is None:
        eval_prompts = train_prompts.select(range(min(8, len(train_prompts))))
    else:
        eval_prompts = probe_prompts

    default_to_lora(script_args, model_args)
    peft_config = get_peft_config(model_args)
    policy = AutoModelForCausalLM.from_pretrained(policy_path)
    ref_policy = None if peft_config is not None else AutoModelForCausalLM.from_pretrained(policy_path)
    value_model = AutoModelForSequenceClassification.from_pretrained(policy_path, num_labels=1)
    value_model.config.pad_token_id = tokenizer.pad_token_id

    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=tokenize_queries(train_prompts, tokenizer),
        eval_dataset=tokenize_queries(eval_prompts, tokenizer),
        peft_config=peft_config,
    )
    scorer = MiCRoReward(reward_model.micro_model, reward_tokenizer, context_column=None)
    probe = probe_prompts is not None and trainer.accelerator.num_processes == 1
    probes = {}
    if probe:
        probes["before"] = probe_policy(trainer, scorer, probe_prompts, group_column, script_args)
    trainer.train()
    if probe:
        probes["after"] = probe_policy(trainer, scorer, probe_prompts, group_column, script_args)
    save_policy(trainer, training_args.output_dir)
    save_run_log(trainer, training_args.output_dir, probes)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.prompt_dataset)
    end_run(trainer)


def save_policy(trainer, output_dir):
    """
    `PPOTrainer.save_model` fails under DeepSpeed with transformers 5 (it hands the policy to code that expects the
    DeepSpeed engine), so under DeepSpeed the policy is saved from the engine's gathered state dict.
    """
    if not trainer.is_deepspeed_enabled:
        trainer.save_model(output_dir)
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # every process takes part under ZeRO-3
    if trainer.accelerator.is_main_process:
        policy = trainer.accelerator.unwrap_model(trainer.model).policy
        prefix = "policy."
        policy_state = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        policy.save_pretrained(output_dir, state_dict=policy_state)
        trainer.processing_class.save_pretrained(output_dir)


def probe_policy(trainer, scorer, probe_prompts, group_column, script_args):
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    return reward_per_context(
        policy, trainer.processing_class, scorer, probe_prompts, group_column, script_args.probe_max_new_tokens
    )


def make_parser(prog: str | None = None) -> TrlParser:
    PPOConfig, _ = ppo_classes()
    return TrlParser((PersonalizedRLArguments, PPOConfig, ModelConfig), prog=prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config()[:3])
