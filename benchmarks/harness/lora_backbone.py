"""
The LoRA-tuned backbone of the benchmark's `--lora` run: MiCRo Stage 1 trained with a LoRA adapter on the backbone
(`peft_config`), on a pool's training pairs without their context; the adapter is then merged, and the comparison runs
again on features of the tuned backbone (every method refits its heads on those cached features).

Three sizes: one for a single GPU, one that a 2-core CPU runs in about an hour on all of hh_relabeled's training
pairs that fit (the `hh_lora` preset of run_all.py), and a small one that a 2-core CPU finishes in minutes (few pairs, one epoch, rank 8
on the attention's query and value projections), which can only show the mechanics.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import PreTrainedTokenizerBase, set_seed

from trl_micro import MiCRoRewardConfig, MiCRoRewardModel, MiCRoRewardTrainer


@dataclass
class LoraTuning:
    """Size of the LoRA Stage 1 run."""

    name: str
    rank: int
    alpha: int
    target_modules: list[str] | str
    num_train_epochs: float
    learning_rate: float
    batch_size: int
    train_pairs_per_context: int | None
    gradient_checkpointing: bool = False
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        pairs = (
            "all training pairs"
            if self.train_pairs_per_context is None
            else (f"{self.train_pairs_per_context} training pairs per context")
        )
        return (
            f"{self.name}: LoRA rank {self.rank} (alpha {self.alpha}) on {self.target_modules}, {pairs}, "
            f"{self.num_train_epochs:g} epoch(s), lr {self.learning_rate:g}, batch {self.batch_size}"
        )


GPU_LORA = LoraTuning("single-GPU configuration", 16, 32, "all-linear", 2, 2e-4, 16, None)
# What a 2-core CPU trains in about half an hour at 192 tokens: every linear layer, one epoch over all training pairs.
CPU_HOUR_LORA = LoraTuning("hour-long CPU configuration", 16, 32, "all-linear", 1, 5e-4, 8, None)
CPU_LORA = LoraTuning("small CPU configuration", 8, 16, ["q_proj", "v_proj"], 1, 5e-4, 8, 32)


def default_lora_tuning() -> LoraTuning:
    return GPU_LORA if torch.cuda.is_available() else CPU_LORA


def tune_backbone_with_lora(
    model_path: str,
    tokenizer: PreTrainedTokenizerBase,
    train_pairs: Dataset,
    num_heads: int,
    tuning: LoraTuning,
    seed: int = 0,
    max_length: int | None = None,
) -> MiCRoRewardModel:
    """MiCRo Stage 1 with a LoRA adapter on `train_pairs` (text, no context column), merged into the backbone."""
    set_seed(seed)
    model = MiCRoRewardModel.from_backbone(model_path, num_heads=num_heads)
    peft_config = LoraConfig(r=tuning.rank, lora_alpha=tuning.alpha, target_modules=tuning.target_modules)
    with tempfile.TemporaryDirectory(prefix="trl-micro-lora-") as output_dir:
        args = MiCRoRewardConfig(
            output_dir=output_dir,
            num_heads=num_heads,
            num_train_epochs=tuning.num_train_epochs,
            learning_rate=tuning.learning_rate,
            per_device_train_batch_size=tuning.batch_size,
            gradient_checkpointing=tuning.gradient_checkpointing,
            max_length=max_length,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            logging_steps=5,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=seed,
            **tuning.extra,
        )
        trainer = MiCRoRewardTrainer(
            model=model, args=args, train_dataset=train_pairs, processing_class=tokenizer, peft_config=peft_config
        )
        trainer.train()
        merged = trainer.model.merge_and_unload()
    return merged.eval()
