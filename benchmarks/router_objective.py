"""
Which likelihood should router adaptation fit: one latent head per pair, or one per context?

`RouterAdaptationTrainer` fits the router to a few labelled pairs per context with the per-pair mixture likelihood
(`mixture_bt_loss`); a router that reads each pair's prompt can then lower it by sending every pair to whichever head
agrees with that pair's label, instead of finding the heads the whole context follows. `context_mixture_bt_loss`
makes the head a latent of the context (the model online routing assumes). This script fits the same Stage-1 router
both ways on the same adaptation pairs and scores both like the benchmark's router adaptation (context in the prompt),
next to the benchmark's own rows: router adaptation by the trainer, online routing, SingleReward and the oracle.

Both fits: full batch (every context's adaptation pairs at once), Adam with the benchmark's router learning rate,
number of steps (`max_steps`, else one step per epoch) and anchor weight, constant learning rate, on cached features
with the context in the prompt.

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/router_objective.py       # synthetic M=8 of BENCHMARKS.md
    python benchmarks/router_objective.py --benchmark synthetic_m4
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.run_all import add_comparison_arguments, load_comparison, start_logging  # noqa: E402
from trl_micro import MiCRoRewardModel  # noqa: E402
from trl_micro.baselines import (  # noqa: E402
    RouterTraining,
    adapt_router,
    adaptation_subset,
    copy_heads_and_router,
    micro_online_routing,
    per_context_oracle_margins,
    routed_margins,
    score,
    split_pool,
    train_heads,
)
from trl_micro.evaluation import ensure_writable, gap_closed, per_context_accuracy  # noqa: E402
from trl_micro.losses import context_mixture_bt_loss, mixture_bt_loss  # noqa: E402

logger = logging.getLogger("benchmarks")

SINGLE, ORACLE = "SingleReward", "Oracle (BT per context)"
TRAINER = "router adaptation (RouterAdaptationTrainer, as benchmarked)"
PER_PAIR, PER_CONTEXT = "router fit, per-pair likelihood", "router fit, per-context likelihood"
ONLINE = "online routing"
METHODS = (SINGLE, TRAINER, PER_PAIR, PER_CONTEXT, ONLINE, ORACLE)
OVERRIDABLE = ("learning_rate", "max_steps", "router_anchor_coef", "batch_size", "adaptation_likelihood")


def per_pair_objective(head_margins, router_logits, context_index):
    return mixture_bt_loss(head_margins, router_logits).mean()


def per_context_objective(head_margins, router_logits, context_index):
    return context_mixture_bt_loss(head_margins, router_logits, context_index).mean()


def fit_router(
    stage1: MiCRoRewardModel,
    router_features: torch.Tensor,
    head_margins: torch.Tensor,
    context_index: torch.Tensor,
    objective: Callable,
    training: RouterTraining,
) -> MiCRoRewardModel:
    """A copy of `stage1` whose router minimizes `objective` + anchor * ||theta - theta_1||^2 (full batch, Adam)."""
    model = copy_heads_and_router(stage1)
    stage1_router = [parameter.detach().clone() for parameter in model.router.parameters()]
    optimizer = torch.optim.Adam(model.router.parameters(), lr=training.learning_rate)
    router_input = model.router_input(router_features).detach()
    steps = training.max_steps if training.max_steps > 0 else int(training.num_train_epochs)  # full batch: a step an epoch
    for _ in range(steps):
        optimizer.zero_grad()
        loss = objective(head_margins, model.router(router_input), context_index)
        drift = sum((p - p1).pow(2).sum() for p, p1 in zip(model.router.parameters(), stage1_router, strict=True))
        (loss + training.router_anchor_coef * drift).backward()
        optimizer.step()
    return model.eval()


def compare_objectives(pool, backbone, tokenizer, spec, plan, seeds) -> dict:
    contexts = spec.contexts or tuple(sorted(set(pool.context_ids)))
    heads, router = plan.comparison.heads, plan.comparison.router
    largest = max(plan.comparison.adaptation_sizes)
    runs = {method: [] for method in METHODS}
    for seed in seeds:
        split = split_pool(pool, contexts, spec.adaptation_per_context, spec.test_per_context, seed)
        test_contexts = [pool.context_ids[pair] for pair in split.test]

        def record(method, margins):
            runs[method].append(per_context_accuracy(margins, test_contexts)["accuracy"])

        single = train_heads(backbone, tokenizer, pool, split.train, heads, seed, num_heads=1)
        record(SINGLE, score(single, pool, split.test, with_context=False).margins)
        record(ORACLE, per_context_oracle_margins(backbone, tokenizer, pool, split, heads, seed))
        micro = train_heads(backbone, tokenizer, pool, split.train, heads, seed, num_heads=spec.num_heads)
        pairs = adaptation_subset(pool, split.adaptation, largest, seed)
        record(TRAINER, score(adapt_router(micro, tokenizer, pool, pairs, router, seed), pool, split.test, True).margins)
        online = micro_online_routing(micro, pool, pairs, plan.comparison.online_eta)
        record(ONLINE, routed_margins(online, test_contexts, score(micro, pool, split.test, False).head_margins))

        head_margins = score(micro, pool, pairs, with_context=True).head_margins
        router_features = pool.tensors(pairs, with_context=True)["router"]
        context_index = torch.tensor([contexts.index(pool.context_ids[pair]) for pair in pairs])
        torch.manual_seed(seed)
        for method, objective in ((PER_PAIR, per_pair_objective), (PER_CONTEXT, per_context_objective)):
            fitted = fit_router(micro, router_features, head_margins, context_index, objective, router)
            record(method, score(fitted, pool, split.test, with_context=True).margins)
        logger.info("%s, seed %d: %s", spec.name, seed, ", ".join(
            f"{method} {100 * np.mean(list(runs[method][-1].values())):.1f}" for method in METHODS))

    mean = {method: {c: float(np.mean([run[c] for run in runs[method]])) for c in contexts} for method in METHODS}
    spread = {method: {c: float(np.std([run[c] for run in runs[method]], ddof=1)) if len(seeds) > 1 else 0.0
                       for c in contexts} for method in METHODS}
    gaps = {method: {c: gap_closed(mean[method][c], mean[SINGLE][c], mean[ORACLE][c]) for c in contexts}
            for method in METHODS}
    return {"benchmark": spec.name, "title": spec.title, "contexts": list(contexts), "seeds": list(seeds),
            "adaptation_per_context": largest, "target": spec.target, "router_training": asdict(router),
            "mean": mean, "std": spread, "gap": gaps, "runs": runs}


def render(result: dict, command: str) -> str:
    contexts = result["contexts"]
    lines = [
        f"# Router adaptation objective: {result['title']}",
        "",
        f"Generated by `{command}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; seeds "
        f"{', '.join(map(str, result['seeds']))}; {result['adaptation_per_context']} adaptation pairs per context; "
        f"router settings {result['router_training']}. See the docstring of `benchmarks/router_objective.py`.",
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
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {100 * np.mean(list(mean.values())):.1f} | {min_gap} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_comparison_arguments(parser, "router_objective.md")
    for name in OVERRIDABLE:
        field_type = {"max_steps": int, "batch_size": int, "adaptation_likelihood": str}.get(name, float)
        parser.add_argument(f"--router_{name.removeprefix('router_')}", dest=name, type=field_type, default=None,
                            help=f"Override the plan's RouterTraining.{name}.")
    args = parser.parse_args(argv)
    start_logging()
    output = ensure_writable(args.output)
    loaded = load_comparison(args.preset, args.benchmark, args.model, args.cache_dir, args.data_dir)
    overrides = {name: getattr(args, name) for name in OVERRIDABLE}
    loaded.plan.comparison.router = replace(
        loaded.plan.comparison.router, **{name: value for name, value in overrides.items() if value is not None}
    )
    result = compare_objectives(loaded.pool, loaded.feature_model.backbone, loaded.tokenizer, loaded.spec,
                                loaded.plan, args.seeds or loaded.plan.seeds)
    command = " ".join(["python", "benchmarks/router_objective.py", *argv])
    output.write_text(render(result, command), encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=1), encoding="utf-8")
    logger.info("Wrote %s", output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
