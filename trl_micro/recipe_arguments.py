"""Arguments shared by the personalized RL recipes (`recipes/grpo_personalized.py`, `recipes/ppo_personalized.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .prompt_datasets import PromptDatasetArguments


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

