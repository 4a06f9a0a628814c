r"""
`trl-micro grpo` / `trl-micro rloo`: train a policy with GRPO or RLOO on a MiCRo personalized reward.

Every prompt comes with a context (a user description); the reward of a completion is the MiCRo reward routed by that
context, so one policy learns what each user prefers. The policy is LoRA-tuned by default.

    trl-micro grpo --reward_model_path outputs/micro-rm --output_dir outputs/grpo-personalized
    trl-micro rloo --accelerate_config zero3 --reward_model_path outputs/micro-rm --output_dir outputs/rloo

On CPU add `--num_processes 2 --mixed_precision no` (with `ACCELERATE_USE_CPU=true`) and, for the script, `--use_cpu
--ddp_backend gloo --bf16 false`. Without `--model_name_or_path`, the policy is the embedded SmolLM2-135M-Instruct.
Without `--prompt_dataset`, the prompts are the synthetic ones with their subpopulations' contexts. Logged per step:
`rewards/micro_reward/mean`, `micro/reward/<context_id>`, `micro/head_reward/<k>` and `micro/head_weight/<k>`; with
`--probe_prompts N`, the mean reward per context of N held-out prompts, before and after.

Per-user Stage 2 state, e.g. what `trl-micro eval --adaptation_pairs N` saved: `--user_column context_id
--online_router eval/online_router.json --residual_heads eval/residual_heads.json` (either store, or both), or
`--user_store sqlite:///users.db` (the database the server's feedback goes to).
(TRL's own `trl grpo --reward_model_name_or_path <checkpoint> --trust_remote_code` also takes a MiCRo checkpoint, routed
on the prompt alone: no context column, no user ids, no per-user stores.)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from trl import GRPOConfig, GRPOTrainer, ModelConfig, RLOOConfig, RLOOTrainer, TrlParser, get_peft_config

from ..bundled.catalog import EMBEDDED_MODEL, resolve_model_path
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

TRAINERS = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}


@dataclass
class GRPOPersonalizedArguments(PersonalizedRLArguments):
    trainer: str = field(default="grpo", metadata={"help": "'grpo' or 'rloo'."})
    reward_model_path: str | None = field(
        default=None, metadata={"help": "A MiCRo reward checkpoint (local path or Hub id)."}
    )
    user_column: str | None = field(
        default=None, metadata={"help": "Column of user ids for --user_store (or --online_router / --residual_heads)."}
    )
    user_store: str | None = field(
        default=None,
        metadata={"help": "User store URL (sqlite:///users.db or postgresql://...): per-user routing and residuals."},
    )
    online_router: str | None = field(default=None, metadata={"help": "An OnlineRouter store (JSON), per user id."})
    residual_heads: str | None = field(default=None, metadata={"help": "A ResidualHeads store (JSON), per user id."})


def main(script_args: GRPOPersonalizedArguments, training_args, model_args: ModelConfig):
    if script_args.reward_model_path is None:
        raise ValueError("--reward_model_path is required: a MiCRo reward checkpoint.")
    trainer_class = TRAINERS[script_args.trainer][1]
    reward = MiCRoReward.from_pretrained(
        resolve_model_path(script_args.reward_model_path, download=True),
        context_column=script_args.context_column,
        user_column=script_args.user_column,
        user_store=script_args.user_store,
        online_router=script_args.online_router,
        residual_heads=script_args.residual_heads,
    )
    dataset = load_prompt_dataset(script_args, reward.config.context_template)
    group_column = script_args.group_column if script_args.group_column in dataset.column_names else None
    reward.group_column = group_column or script_args.context_column
    train_dataset, probe_dataset = hold_out_per_context(dataset, script_args.probe_prompts, reward.group_column)

    default_to_lora(script_args, model_args)
    trainer = trainer_class(
        model=resolve_model_path(model_args.model_name_or_path or EMBEDDED_MODEL),
        reward_funcs=[reward],
        args=training_args,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
    )
    reward.prepare(trainer.accelerator)

    probe = probe_dataset is not None and trainer.accelerator.num_processes == 1
    probes = {}
    if probe:
        probes["before"] = probe_policy(trainer, reward, probe_dataset, script_args)
    trainer.train()
    if probe:
        probes["after"] = probe_policy(trainer, reward, probe_dataset, script_args)
    trainer.save_model(training_args.output_dir)
    save_run_log(trainer, training_args.output_dir, probes)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.prompt_dataset)
    end_run(trainer)


def probe_policy(trainer, reward, probe_dataset, script_args):
    policy = trainer.accelerator.unwrap_model(trainer.model)
    return reward_per_context(
        policy, trainer.processing_class, reward, probe_dataset, reward.group_column, script_args.probe_max_new_tokens
    )


def make_parser(prog: str | None = None, trainer: str = "grpo") -> TrlParser:
    """The parser of `trainer` ('grpo' or 'rloo'): its config class is GRPOConfig or RLOOConfig."""
    if trainer not in TRAINERS:
        raise ValueError(f"--trainer must be one of {sorted(TRAINERS)}, got {trainer!r}.")
    return TrlParser((GRPOPersonalizedArguments, TRAINERS[trainer][0], ModelConfig), prog=prog)


def parse(argv: list[str] | None = None):
    """`--trainer` picks the config class (GRPOConfig or RLOOConfig) before TrlParser reads the rest."""
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--trainer", default="grpo")
    chosen, _ = pre_parser.parse_known_args(argv)
    if chosen.trainer not in TRAINERS:
        sys.exit(f"--trainer must be one of {sorted(TRAINERS)}, got {chosen.trainer!r}.")
    return make_parser(trainer=chosen.trainer).parse_args_and_config(argv)[:3]


if __name__ == "__main__":
    main(*parse())
