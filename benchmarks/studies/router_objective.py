"""
Which likelihood should router adaptation fit: one latent head per pair, or one per context?

With `adaptation_likelihood="pair"` (`mixture_bt_loss`) every adaptation pair has its own latent head, so a router that
reads each pair's prompt can lower the loss by sending every pair to whichever head agrees with that pair's label,
instead of finding the heads the whole context follows. `"context"` (`context_mixture_bt_loss`) makes the head a
latent of the context, the model online routing assumes. This script adapts the same Stage-1 model both ways with
`RouterAdaptationTrainer` and the plan's router settings (only the likelihood differs), scores both like the
benchmark's router adaptation (context in the prompt), next to online routing, SingleReward and the oracle, and
probes how well the router's input names the context at all.

    OMP_NUM_THREADS=2 nice -n 10 python -m benchmarks.studies.router_objective       # synthetic M=8 of BENCHMARKS.md
    python -m benchmarks.studies.router_objective --benchmark synthetic_m4 --router_batch_size 32
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from dataclasses import asdict, replace

import numpy as np
import torch

from benchmarks import start_logging, write_study_report
from benchmarks.harness.comparison import (
    adapt_router,
    adaptation_subset,
    micro_online_routing,
    reference_accuracy,
    score,
    train_heads,
)
from benchmarks.harness.metrics import gap_closed
from benchmarks.harness.plan import (
    add_comparison_arguments,
    comparison_summary,
    load_comparison,
    split_for,
)
from trl_micro import MiCRoRewardModel
from trl_micro.evaluation import per_context_accuracy
from trl_micro.evaluation_reports import ensure_writable
from trl_micro.personalization.adaptation import routed_margins

logger = logging.getLogger("benchmarks")

SINGLE, ORACLE = "SingleReward", "Oracle (BT per context)"
PER_PAIR, PER_CONTEXT = "router adaptation, per-pair likelihood", "router adaptation, per-context likelihood"
LIKELIHOODS = {PER_PAIR: "pair", PER_CONTEXT: "context"}
ONLINE = "online routing"
METHODS = (SINGLE, PER_PAIR, PER_CONTEXT, ONLINE, ORACLE)
OVERRIDABLE = ("learning_rate", "max_steps", "router_anchor_coef", "batch_size")


def context_probe_accuracy(model: MiCRoRewardModel, pool, contexts, seed: int, steps: int = 500) -> float:
    """
    How well the router's input names the context: a multinomial logistic regression (Adam, L2 1e-3) from what the
    router reads on the evaluation pairs' prompts with their context, trained on a random half, accuracy on the other.
    """
    pairs = [pair for pair in range(pool.num_with_context) if pool.context_ids[pair] in contexts]
    features = model.router_input(pool.tensors(pairs, with_context=True)["router"].float()).detach()
    labels = torch.tensor([contexts.index(pool.context_ids[pair]) for pair in pairs])
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    train, test = order[: len(pairs) // 2], order[len(pairs) // 2 :]
    torch.manual_seed(seed)
    probe = torch.nn.Linear(features.shape[1], len(contexts))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(features[train]), labels[train])
        (loss + 1e-3 * probe.weight.pow(2).sum()).backward()
        optimizer.step()
    return float((probe(features[test]).argmax(dim=-1) == labels[test]).float().mean())


def compare_objectives(pool, backbone, tokenizer, spec, plan, seeds) -> dict:
    contexts = spec.contexts or tuple(sorted(set(pool.context_ids)))
    heads, router = plan.comparison.heads, plan.comparison.router
    largest = max(plan.comparison.adaptation_sizes)
    runs = {method: [] for method in METHODS}
    for seed in seeds:
        split = split_for(pool, spec, seed)
        test_contexts = [pool.context_ids[pair] for pair in split.test]

        def record(method, margins):
            runs[method].append(per_context_accuracy(margins, test_contexts)["accuracy"])

        references = reference_accuracy(backbone, tokenizer, pool, split, heads, seed)
        runs[SINGLE].append(references["single"])
        runs[ORACLE].append(references["oracle"])
        micro = train_heads(backbone, tokenizer, pool, split.train, heads, seed, num_heads=spec.num_heads)
        pairs = adaptation_subset(pool, split.adaptation, largest, seed)
        for method, likelihood in LIKELIHOODS.items():
            adapted = adapt_router(
                micro, tokenizer, pool, pairs, replace(router, adaptation_likelihood=likelihood), seed
            )
            record(method, score(adapted, pool, split.test, with_context=True).margins)
        online = micro_online_routing(micro, pool, pairs, plan.comparison.online_eta)
        record(ONLINE, routed_margins(online, test_contexts, score(micro, pool, split.test, False).head_margins))
        logger.info(
            "%s, seed %d: %s",
            spec.name,
            seed,
            ", ".join(f"{method} {100 * np.mean(list(runs[method][-1].values())):.1f}" for method in METHODS),
        )

    probe = [context_probe_accuracy(micro, pool, list(contexts), seed) for seed in seeds]
    mean = {method: {c: float(np.mean([run[c] for run in runs[method]])) for c in contexts} for method in METHODS}
    spread = {
        method: {
            c: float(np.std([run[c] for run in runs[method]], ddof=1)) if len(seeds) > 1 else 0.0 for c in contexts
        }
        for method in METHODS
    }
    gaps = {
        method: {c: gap_closed(mean[method][c], mean[SINGLE][c], mean[ORACLE][c]) for c in contexts}
        for method in METHODS
    }
    return {
        **comparison_summary(spec, contexts, seeds, largest),
        "router_training": {key: value for key, value in asdict(router).items() if key != "adaptation_likelihood"},
        "context_probe_accuracy": probe,
        "mean": mean,
        "std": spread,
        "gap": gaps,
        "runs": runs,
    }


def render(result: dict, command: str) -> str:
    contexts = result["contexts"]
    lines = [
        f"# Router adaptation objective: {result['title']}",
        "",
        f"Generated by `{command}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; seeds "
        f"{', '.join(map(str, result['seeds']))}; {result['adaptation_per_context']} adaptation pairs per context; "
        f"router settings {result['router_training']}. See the docstring of `benchmarks/studies/router_objective.py`.",
        "",
        "Test accuracy (%) per context, mean ± standard deviation over seeds; gap closed = (acc - SingleReward) / "
        f"(Oracle - SingleReward) on the seed means (target >= {result['target']}).",
        "",
        "| method | " + " | ".join(contexts) + " | macro | min gap closed |",
        "|---|" + "---|" * (len(contexts) + 2),
    ]
    for method in METHODS:
        mean, std, gap = result["mean"][method], result["std"][method], result["gap"][method]
        cells = [f"{100 * mean[c]:.1f} ± {100 * std[c]:.1f}" for c in contexts]
        finite = [value for value in gap.values() if np.isfinite(value)]
        min_gap = f"{min(finite):.2f}" if method not in (SINGLE, ORACLE) and finite else ""
        lines.append(
            f"| {method} | " + " | ".join(cells) + f" | {100 * np.mean(list(mean.values())):.1f} | {min_gap} |"
        )
    probe = result["context_probe_accuracy"]
    lines += [
        "",
        f"Context probe (`context_probe_accuracy`: a linear classifier on what the router reads, prompts with "
        f"their context, half of the evaluation pairs to train, half to test): {100 * np.mean(probe):.1f}% "
        f"held-out accuracy over {len(contexts)} contexts (per seed: "
        f"{', '.join(f'{100 * value:.1f}' for value in probe)}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_comparison_arguments(parser, "router_objective.md")
    for name in OVERRIDABLE:
        field_type = int if name in ("max_steps", "batch_size") else float
        parser.add_argument(
            f"--router_{name.removeprefix('router_')}",
            dest=name,
            type=field_type,
            default=None,
            help=f"Override the plan's RouterTraining.{name}.",
        )
    args = parser.parse_args(argv)
    start_logging()
    output = ensure_writable(args.output)
    loaded = load_comparison(args.preset, args.benchmark, args.model, args.cache_dir, args.data_dir)
    overrides = {name: getattr(args, name) for name in OVERRIDABLE}
    loaded.plan.comparison.router = replace(
        loaded.plan.comparison.router, **{name: value for name, value in overrides.items() if value is not None}
    )
    result = compare_objectives(
        loaded.pool,
        loaded.feature_model.backbone,
        loaded.tokenizer,
        loaded.spec,
        loaded.plan,
        args.seeds or loaded.plan.seeds,
    )
    write_study_report(output, "benchmarks.studies.router_objective", argv, result, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
