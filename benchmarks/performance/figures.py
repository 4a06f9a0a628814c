"""
Performance figures of the benchmark report.

- Stage 1 epoch time with a frozen backbone: the feature cache (the backbone runs once, before training; epochs train
  the heads and router on cached features) against the slow path (`use_feature_cache=False`: the backbone runs on
  every step).
- Reward scoring cost of a MiCRo reward model (K heads + router) against a plain single-head reward model
  (`AutoModelForSequenceClassification`, `num_labels=1`) on the same backbone: measured by benchmarks/performance/reward_overhead.py,
  run as it is; the whole GRPO step by benchmarks/performance/grpo_step.py; the per-sequence feature store against the per-pair
  cache by benchmarks/performance/feature_store.py (`run_script`).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from trl_micro import MiCRoRewardConfig, MiCRoRewardModel, MiCRoRewardTrainer


@dataclass
class EpochTiming:
    num_pairs: int
    slow_epoch_seconds: float
    cache_build_seconds: float
    cached_epoch_seconds: float

    @property
    def speedup(self) -> float:
        return self.slow_epoch_seconds / self.cached_epoch_seconds


def _stage1_trainer(model_path, tokenizer, pairs, use_feature_cache, cache_dir, output_dir, num_heads):
    args = MiCRoRewardConfig(
        output_dir=output_dir,
        num_heads=num_heads,
        freeze_backbone=True,
        use_feature_cache=use_feature_cache,
        feature_cache_dir=cache_dir,
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=5e-3,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    model = MiCRoRewardModel.from_backbone(model_path, num_heads=num_heads)
    return MiCRoRewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)


def time_stage1_epoch(
    model_path: str, tokenizer: PreTrainedTokenizerBase, pairs: Dataset, num_heads: int = 4
) -> EpochTiming:
    """One Stage 1 epoch over `pairs` on the slow path and on the feature cache (built in a fresh directory)."""
    with tempfile.TemporaryDirectory(prefix="trl-micro-perf-") as scratch:
        slow = _stage1_trainer(model_path, tokenizer, pairs, False, None, f"{scratch}/slow", num_heads)
        started = time.perf_counter()
        slow.train()
        slow_seconds = time.perf_counter() - started

        started = time.perf_counter()
        cached = _stage1_trainer(model_path, tokenizer, pairs, True, f"{scratch}/cache", f"{scratch}/cached", num_heads)
        build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        cached.train()
        cached_seconds = time.perf_counter() - started
    return EpochTiming(len(pairs), slow_seconds, build_seconds, cached_seconds)


def run_script(name: str, output: Path, *arguments: str) -> str:
    """Run the performance script benchmarks/performance/<name>.py as it is (it writes its Markdown report to `output`); returns
    that report. It runs from the repository root with paths relative to it, so the command line its report quotes is
    one that anyone can rerun from a checkout."""
    root = Path(__file__).resolve().parents[2]
    output = Path(output).resolve()
    shown = output.relative_to(root) if output.is_relative_to(root) else output
    subprocess.run(
        [sys.executable, "-m", f"benchmarks.performance.{name}", *arguments, "--output", str(shown)],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=root,
    )
    return output.read_text(encoding="utf-8")


def run_reward_overhead(completions: int, repetitions: int, output: Path) -> str:
    """Reward scoring cost, MiCRo against a plain single-head reward model (benchmarks/performance/reward_overhead.py)."""
    return run_script("reward_overhead", output, "--completions", str(completions), "--repetitions", str(repetitions))
