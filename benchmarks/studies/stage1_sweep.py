"""
What limits MiCRo + online routing on one comparison of BENCHMARKS.md: the Stage 1 heads, or picking among them?

For every variant of the Stage 1 settings (K, head training, online eta) and every seed, this trains MiCRo Stage 1 on
the comparison's training pairs and reports per context:

- ceiling: the accuracy of the Stage-1 head that is best on the test pairs themselves (no routing that gives a
  context one head can do better: the heads are the limit);
- online: MiCRo + online routing with the adaptation size BENCHMARKS.md reports (32 pairs per context);
- picks: in how many (context, seed) cases the online posterior's top head is that best head (the selection).

- train NLL: the Stage 1 objective (the mixture loss with the trainer's latent groups) on the training pairs, the
  value training minimizes: a variant that starts from the per-context oracle heads (`"init": "oracle"`, a
  diagnostic that uses the context labels) shows whether the objective prefers the contexts' heads to what training
  from a random start finds.

Accuracies as the gap closed between SingleReward and the per-context oracle, the quantity of the benchmark's target; the
two references are trained with the variant's head training, as the benchmark trains every method with the same.
Writes `benchmarks/studies/results/stage1_sweep.{md,json}`.

    OMP_NUM_THREADS=2 nice -n 10 python -m benchmarks.studies.stage1_sweep                  # synthetic M=8, default variants
    python -m benchmarks.studies.stage1_sweep --benchmark synthetic_m4 --variants my.json   # [{"name": .., "num_heads": ..,
                                                                                    #   "heads": {..}, "eta": ..}]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks import start_logging, write_study_report
from benchmarks.harness.comparison import (
    HeadTraining,
    adaptation_subset,
    micro_online_routing,
    per_context_oracle_models,
    reference_accuracy,
    score,
    train_heads,
)
from benchmarks.harness.metrics import best_head_accuracy, best_heads, gap_closed
from benchmarks.harness.plan import (
    add_comparison_arguments,
    benchmark_settings,
    comparison_summary,
    load_comparison,
    split_for,
)
from trl_micro.evaluation import per_context_accuracy
from trl_micro.evaluation_reports import ensure_writable
from trl_micro.losses import context_mixture_bt_loss
from trl_micro.personalization.adaptation import routed_margins

logger = logging.getLogger("benchmarks")

DEFAULT_VARIANTS = [
    {"name": "benchmark settings"},
    {"name": "K = M", "num_heads_minus_contexts": 0},
    {"name": "K = M + 4", "num_heads_minus_contexts": 4},
    {"name": "balance weight 0.1", "heads": {"router_balance_coef": 0.1}},
    {"name": "balance weight 1.0", "heads": {"router_balance_coef": 1.0}},
    {"name": "15 epochs", "heads": {"num_train_epochs": 15}},
    {"name": "60 epochs", "heads": {"num_train_epochs": 60}},
    {"name": "batch size 64", "heads": {"batch_size": 64}},
    {"name": "weight decay 0.1", "heads": {"weight_decay": 0.1}},
    {"name": "weight decay 0.3", "heads": {"weight_decay": 0.3}},
    {"name": "weight decay 1.0", "heads": {"weight_decay": 1.0}},
    {"name": "online eta 0.3", "eta": 0.3},
]
"""A variant changes the benchmark's settings: `num_heads` (or `num_heads_minus_contexts`), `heads` (HeadTraining
fields), `eta` (the online router's learning rate) and `init` ("random", the trainer's; "oracle": K = the number of
contexts, head k starts as the BT head trained on context k's pairs); unnamed fields keep the benchmark's values."""

VARIANT_KEYS = {"name", "num_heads", "num_heads_minus_contexts", "heads", "eta", "init"}
INITS = ("random", "oracle")


def check_variants(variants: list[dict]) -> None:
    head_fields = set(asdict(HeadTraining()))
    for index, variant in enumerate(variants):
        unknown = set(variant) - VARIANT_KEYS
        if unknown or "name" not in variant:
            raise ValueError(
                f"Variant {index} ({variant}) must have a `name` and only the keys {sorted(VARIANT_KEYS)}; "
                f"unknown: {sorted(unknown)}."
            )
        if variant.get("init", "random") not in INITS:
            raise ValueError(f"Variant {variant['name']!r}: `init` must be one of {INITS}, got {variant['init']!r}.")
        bad = set(variant.get("heads", {})) - head_fields
        if bad:
            raise ValueError(
                f"Variant {variant['name']!r}: `heads` fields {sorted(bad)} are not HeadTraining fields "
                f"({sorted(head_fields)})."
            )


def stage1_objective(micro, pool, pairs) -> float:
    """The mixture loss Stage 1 minimizes (latent groups as the trainer forms them, no regularizer) on `pairs`."""
    scores = score(micro, pool, pairs, with_context=False)
    groups = torch.tensor(pool.latent_groups(pairs, with_context=False))
    return float(context_mixture_bt_loss(scores.head_margins, scores.router_logits, groups).mean())


def mean_over_seeds(runs: list[dict], contexts) -> dict[str, float]:
    return {context: float(np.mean([run[context] for run in runs])) for context in contexts}


def sweep(pool, backbone, tokenizer, spec, plan, variants, seeds) -> dict:
    contexts = spec.contexts or tuple(sorted(set(pool.context_ids)))
    settings = benchmark_settings(plan, spec)  # the head training and adaptation size the benchmark itself uses
    heads, largest = settings.heads, settings.reported_size
    splits = {seed: split_for(pool, spec, seed) for seed in seeds}
    test_contexts = {seed: [pool.context_ids[pair] for pair in split.test] for seed, split in splits.items()}

    references = {}

    def seed_mean_references(training: HeadTraining) -> dict[str, dict[str, float]]:
        """Seed-mean SingleReward and oracle accuracy per context, trained with `training` (as in the benchmark)."""
        key = json.dumps(asdict(training), sort_keys=True)
        if key not in references:
            runs = [
                reference_accuracy(backbone, tokenizer, pool, split, training, seed) for seed, split in splits.items()
            ]
            references[key] = {
                name: mean_over_seeds([run[name] for run in runs], contexts) for name in ("single", "oracle")
            }
        return references[key]

    rows = []
    for variant in variants:
        started = time.perf_counter()
        num_heads = variant.get("num_heads", spec.num_heads)
        if "num_heads_minus_contexts" in variant:
            num_heads = len(contexts) + variant["num_heads_minus_contexts"]
        training = replace(heads, **variant.get("heads", {}))
        eta = variant.get("eta", settings.online_eta)
        init = variant.get("init", "random")
        if init == "oracle" and num_heads != len(contexts):
            raise ValueError(
                f"Variant {variant['name']!r}: init 'oracle' needs one head per context "
                f"(K = {len(contexts)}), got K = {num_heads}."
            )
        ceiling, online, picks, train_nll = [], [], 0, []
        for seed, split in splits.items():
            initial_heads = None
            if init == "oracle":
                oracle = per_context_oracle_models(backbone, tokenizer, pool, split, contexts, training, seed)
                initial_heads = torch.cat([oracle[context].heads.weight.data for context in contexts])
            micro = train_heads(
                backbone, tokenizer, pool, split.train, training, seed, num_heads=num_heads, initial_heads=initial_heads
            )
            train_nll.append(stage1_objective(micro, pool, split.train))
            test = score(micro, pool, split.test, with_context=False).head_margins
            best = best_heads(test, test_contexts[seed])
            ceiling.append(best_head_accuracy(test, test_contexts[seed], best)["accuracy"])
            router = micro_online_routing(micro, pool, adaptation_subset(pool, split.adaptation, largest, seed), eta)
            margins = routed_margins(router, test_contexts[seed], test)
            online.append(per_context_accuracy(margins, test_contexts[seed])["accuracy"])
            picks += sum(int(router.weights(context).argmax()) == best[context] for context in contexts)
        reference = seed_mean_references(training)
        single, oracle = reference["single"], reference["oracle"]
        row = {
            "variant": variant["name"],
            "num_heads": num_heads,
            "heads": asdict(training),
            "eta": eta,
            "init": init,
            "train_nll": float(np.mean(train_nll)),
            "single": single,
            "oracle": oracle,
            "picks": picks,
            "cases": len(contexts) * len(seeds),
            "seconds": time.perf_counter() - started,
        }
        for name, runs in (("ceiling", ceiling), ("online", online)):
            accuracy = mean_over_seeds(runs, contexts)
            row[name] = {
                "accuracy": accuracy,
                "gap": {c: gap_closed(accuracy[c], single[c], oracle[c]) for c in contexts},
            }
        rows.append(row)
        logger.info(
            "%s: online min gap %.2f, ceiling min gap %.2f, %d/%d picks (%.0f s)",
            variant["name"],
            min(row["online"]["gap"].values()),
            min(row["ceiling"]["gap"].values()),
            picks,
            row["cases"],
            row["seconds"],
        )
    return {
        **comparison_summary(spec, contexts, seeds, largest),
        "benchmark_heads": asdict(heads),
        "variants": rows,
    }


def head_training_label(heads: dict, benchmark_heads: dict) -> str:
    changed = [f"{name}={value}" for name, value in heads.items() if benchmark_heads[name] != value]
    return ", ".join(changed) or "as in the benchmark"


def render(result: dict, command: str) -> str:
    contexts = result["contexts"]
    target = result["target"]
    lines = [
        f"# Stage 1 sweep: {result['title']}",
        "",
        f"Generated by `{command}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; seeds "
        f"{', '.join(map(str, result['seeds']))}. See the docstring of `benchmarks/studies/stage1_sweep.py` for the method.",
        "",
        f"Gap closed per context = (acc - SingleReward) / (Oracle - SingleReward) on seed-mean accuracies (target "
        f">= {target}). *online*: MiCRo + online routing with {result['adaptation_per_context']} adaptation pairs "
        "per context; *ceiling*: the Stage-1 head best on the test pairs; *picks*: (context, seed) cases where the "
        "online posterior's top head is that head; *train NLL*: the Stage 1 objective on the training pairs (mean over "
        "seeds; lower is what training seeks).",
        "",
        "References, trained with each variant's head training (as the benchmark trains every method with the same):",
        "",
        "| head training | reference | " + " | ".join(contexts) + " |",
        "|---|---|" + "---|" * len(contexts),
    ]
    shown = set()
    for row in result["variants"]:
        label = head_training_label(row["heads"], result["benchmark_heads"])
        if label in shown:
            continue
        shown.add(label)
        for name, title in (("single", "SingleReward acc."), ("oracle", "Oracle acc.")):
            lines.append(
                f"| {label if name == 'single' else ''} | {title} | "
                + " | ".join(f"{100 * row[name][c]:.1f}" for c in contexts)
                + " |"
            )
    lines += [
        "",
        "| variant | K | | " + " | ".join(contexts) + " | min | macro acc. | picks | train NLL |",
        "|---|---|---|" + "---|" * len(contexts) + "---|---|---|---|",
    ]
    for row in result["variants"]:
        for name in ("online", "ceiling"):
            gaps = row[name]["gap"]
            macro = 100 * float(np.mean(list(row[name]["accuracy"].values())))
            picks = f"{row['picks']}/{row['cases']}" if name == "online" else ""
            nll = f"{row['train_nll']:.4f}" if name == "online" else ""
            lines.append(
                f"| {row['variant'] if name == 'online' else ''} | {row['num_heads'] if name == 'online' else ''} | "
                f"{name} | "
                + " | ".join(f"{gaps[c]:.2f}" for c in contexts)
                + f" | {min(gaps.values()):.2f} | {macro:.1f} | {picks} | {nll} |"
            )
    return "\n".join(lines) + "\n"


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_comparison_arguments(parser, "stage1_sweep.md")
    parser.add_argument("--variants", default=None, help="JSON file with a list of variants (default: built in).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    start_logging()
    variants = DEFAULT_VARIANTS if args.variants is None else json.loads(Path(args.variants).read_text())
    check_variants(variants)
    output = ensure_writable(args.output)
    loaded = load_comparison(args.preset, args.benchmark, args.model, args.cache_dir, args.data_dir)
    result = sweep(
        loaded.pool,
        loaded.feature_model.backbone,
        loaded.tokenizer,
        loaded.spec,
        loaded.plan,
        variants,
        args.seeds or loaded.plan.seeds,
    )
    write_study_report(output, "benchmarks.studies.stage1_sweep", argv, result, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
