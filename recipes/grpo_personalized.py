# Copyright the trl-micro authors. Apache-2.0.
"""
Train a policy with GRPO (or RLOO: `--trainer rloo`) on a MiCRo personalized reward.

Every prompt comes with a context (a user description); the reward of a completion is the MiCRo reward routed by that
context, so one policy learns what each user prefers. The policy is LoRA-tuned by default.

    python recipes/grpo_personalized.py --reward_model_path micro-rm --output_dir grpo-personalized

    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml \
        recipes/grpo_personalized.py --reward_model_path micro-rm --output_dir grpo-personalized

On CPU add `--num_processes 2 --mixed_precision no` to `accelerate launch` (with `ACCELERATE_USE_CPU=true`) and
`--use_cpu --ddp_backend gloo --bf16 false` to the script. Without `--model_name_or_path`, the policy is the embedded
SmolLM2-135M-Instruct. Without `--prompt_dataset`, the prompts are the synthetic ones with their subpopulations'
contexts. Logged per step: `rewards/micro_reward/mean`, `micro/reward/<context_id>`, `micro/head_reward/<k>` and
`micro/head_weight/<k>`; with `--probe_prompts N`, the mean reward per context of N held-out prompts, before and after.

Per-user Stage 2 state, e.g. what `trl-micro eval --adaptation_pairs N` saved: `--user_column context_id
--online_router eval/online_router.json --residual_heads eval/residual_heads.json` (either store, or both).
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

from trl import GRPOConfig, GRPOTrainer, ModelConfig, RLOOConfig, RLOOTrainer, TrlParser, get_peft_config

from trl_micro.bundled.embedded import embedded_model_path
from trl_micro.scripts.rl_utils import load_prompt_dataset, reward_per_context
from trl_micro.data_utils import hold_out_per_context
from trl_micro.scripts.rl_utils import PersonalizedRLArguments
from trl_micro.rewards import MiCRoReward

TRAINERS = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class GRPOPersonalizedArguments(PersonalizedRLArguments):
    trainer: str = field(default="grpo", metadata={"help": "'grpo' or 'rloo'."})
    reward_model_path: str | None = field(default=None, metadata={"help": "A MiCRo reward checkpoint."})
    user_column: str | None = field(
        default=None, metadata={"help": "Column of user / context ids for --online_router and --residual_heads."}
    )
    online_router: str | None = field(default=None, metadata={"help": "An OnlineRouter store (JSON), per user id."})
    residual_heads: str | None = field(default=None, metadata={"help": "A ResidualHeads store (JSON), per user id."})


def main(script_args: GRPOPersonalizedArguments, training_args, model_args: ModelConfig):
    if script_args.reward_model_path is None:
        raise ValueError("--reward_model_path is required: a MiCRo reward checkpoint.")
    trainer_class = TRAINERS[script_args.trainer][1]
    reward = MiCRoReward.from_pretrained(
        script_args.reward_model_path,
        context_column=script_args.context_column,
        user_column=script_args.user_column,
        online_router=script_args.online_router,
        residual_heads=script_args.residual_heads,
    )
    dataset = load_prompt_dataset(script_args, reward.config.context_template)
    group_column = script_args.group_column if script_args.group_column in dataset.column_names else None
    reward.group_column = group_column or script_args.context_column
    train_dataset, probe_dataset = hold_out_per_context(dataset, script_args.probe_prompts, reward.group_column)

    if not script_args.full_finetune:
        model_args.use_peft = True
        model_args.lora_target_modules = model_args.lora_target_modules or DEFAULT_LORA_TARGETS
    trainer = trainer_class(
        model=model_args.model_name_or_path or embedded_model_path(),
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
    if trainer.accelerator.is_main_process:
        with open(os.path.join(training_args.output_dir, "personalized_rewards.json"), "w") as file:
            json.dump({"log_history": trainer.state.log_history, "probe": probes}, file, indent=1)
        if probes:
            trainer.accelerator.print(f"Mean reward per context on held-out prompts: {json.dumps(probes)}")
    trainer.accelerator.end_training()


def probe_policy(trainer, reward, probe_dataset, script_args):
    policy = trainer.accelerator.unwrap_model(trainer.model)
    return reward_per_context(
        policy, trainer.processing_class, reward, probe_dataset, reward.group_column, script_args.probe_max_new_tokens
    )


def parse(argv=None):
    """`--trainer` picks the config class (GRPOConfig or RLOOConfig) before TrlParser reads the rest."""
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--trainer", default="grpo")
    chosen, _ = pre_parser.parse_known_args(argv)
    if chosen.trainer not in TRAINERS:
        sys.exit(f"--trainer must be one of {sorted(TRAINERS)}, got {chosen.trainer!r}.")
    parser = TrlParser((GRPOPersonalizedArguments, TRAINERS[chosen.trainer][0], ModelConfig))
    return parser.parse_args_and_config(argv)[:3]


if __name__ == "__main__":
    main(*parse())
