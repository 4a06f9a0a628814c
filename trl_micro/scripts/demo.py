"""
The demo: SingleReward (one Bradley-Terry head) against MiCRo (K heads + router) on synthetic preferences from
conflicting subpopulations, over the same frozen backbone and the same cached features.

Every prompt carries its subpopulation's context, so MiCRo's router can read whose preference it is scoring, while
one BT head can only fit the average taste. The table shows, per subpopulation, the routed accuracy of both models,
the best single MiCRo head, and how much weight the router gives each head.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

from transformers import AutoTokenizer

from ..bundled.catalog import resolve_model_path
from ..bundled.synthetic import SyntheticPreferenceConfig, generate_synthetic_preferences
from ..scoring import score_preference_pairs
from ..splits import split_by_context
from ..trainer import MiCRoRewardConfig, MiCRoRewardTrainer


@dataclass
class DemoArguments:
    model_name_or_path: str = field(default="embedded", metadata={"help": "Backbone; 'embedded' = SmolLM2-135M."})
    num_subpopulations: int = field(default=2, metadata={"help": "M, hidden subpopulations in the synthetic data."})
    num_heads: int = field(default=2, metadata={"help": "K, MiCRo's reward heads (one per subpopulation)."})
    train_pairs_per_subpopulation: int = field(default=120, metadata={"help": "Training pairs per subpopulation."})
    test_pairs_per_subpopulation: int = field(default=60, metadata={"help": "Test pairs per subpopulation."})
    num_train_epochs: int = field(default=30, metadata={"help": "Epochs over the cached features."})
    learning_rate: float = field(default=5e-3, metadata={"help": "AdamW learning rate of heads and router."})
    seed: int = field(default=0, metadata={"help": "Seed of the data and of training."})
    feature_cache_dir: str | None = field(default=None, metadata={"help": "Feature cache (default: a temp dir)."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the results to this JSON file."})


def train_reward_model(model_path, tokenizer, train_dataset, num_heads, args: DemoArguments, output_dir, cache_dir):
    config = MiCRoRewardConfig(
        output_dir=output_dir,
        num_heads=num_heads,
        freeze_backbone=True,
        feature_cache_dir=cache_dir,
        per_device_train_batch_size=32,
        num_train_epochs=args.num_train_epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=50,
        report_to="none",
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=False,
    )
    # A path: the trainer wraps it with fresh heads and router drawn from `config.seed` (`build_micro_model`).
    trainer = MiCRoRewardTrainer(model=model_path, args=config, train_dataset=train_dataset, processing_class=tokenizer)
    trainer.train()
    return trainer.model.eval()


def run_demo(args: DemoArguments) -> dict:
    """Train both models and return per-subpopulation accuracies, per-head accuracies and head usage."""
    started = time.perf_counter()
    model_path = resolve_model_path(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    per_subpopulation = args.train_pairs_per_subpopulation + args.test_pairs_per_subpopulation
    data = generate_synthetic_preferences(
        SyntheticPreferenceConfig(
            num_subpopulations=args.num_subpopulations, num_pairs_per_subpopulation=per_subpopulation, seed=args.seed
        )
    )
    share = args.train_pairs_per_subpopulation / per_subpopulation
    splits = split_by_context(data, context_column="context_id", fractions=(share, 0.0, 1.0 - share), seed=args.seed)
    train_dataset, test_dataset = splits["train"], splits["test"]

    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.feature_cache_dir or f"{scratch}/features"
        results = {"subpopulations": sorted(set(test_dataset["context_id"])), "methods": {}}
        for name, num_heads in (("SingleReward", 1), ("MiCRo", args.num_heads)):
            model = train_reward_model(
                model_path, tokenizer, train_dataset, num_heads, args, f"{scratch}/{name}", cache_dir
            )
            scores = score_preference_pairs(model, test_dataset, tokenizer, feature_cache_dir=cache_dir)
            results["methods"][name] = summarize(scores, test_dataset["context_id"], results["subpopulations"])
    results["seconds"] = time.perf_counter() - started
    return results


def summarize(scores, context_ids, subpopulations) -> dict:
    summary = {}
    for context in subpopulations:
        rows = [i for i, c in enumerate(context_ids) if c == context]
        head_margins = scores.head_margins[rows]
        summary[context] = {
            "routed_accuracy": (scores.margins[rows] > 0).float().mean().item(),
            "head_accuracy": (head_margins > 0).float().mean(dim=0).tolist(),
            "head_usage": scores.mixture_weights[rows].mean(dim=0).tolist(),
        }
    return summary


def format_results(results: dict) -> str:
    single, micro = results["methods"]["SingleReward"], results["methods"]["MiCRo"]
    lines = [
        "| subpopulation | SingleReward | MiCRo (routed) | best MiCRo head | MiCRo head usage |",
        "|---|---|---|---|---|",
    ]
    for context in results["subpopulations"]:
        heads = micro[context]["head_accuracy"]
        best = max(range(len(heads)), key=heads.__getitem__)
        usage = " ".join(f"{u:.2f}" for u in micro[context]["head_usage"])
        lines.append(
            f"| {context} | {single[context]['routed_accuracy']:.3f} | {micro[context]['routed_accuracy']:.3f} "
            f"| head {best}: {heads[best]:.3f} | {usage} |"
        )
    lines.append(f"\n(train + evaluation: {results['seconds']:.0f} s)")
    return "\n".join(lines)
