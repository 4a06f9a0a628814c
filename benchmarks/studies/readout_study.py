"""
Which backbone readout should the reward heads and the router read, on every comparison of the benchmark?

A readout (`MiCRoConfig.reward_readout`, `reward_layer`, `router_readout`; math in `trl_micro.modeling_micro`) says
what of the backbone's hidden states the heads and the router see. For each comparison of run_all's full plan and each
readout, with the library's Stage 1 defaults (the comparison's own head training where the plan sets one), this study
measures the methods that tell whether a label-free Stage 1 finds the contexts:

- SingleReward and the per-context oracle on the same features (the two ends of the gap);
- MiCRo Stage 1 routed with the context in the prompt, and its best head per context (what online routing can reach);
- MiCRo + online routing and + residual heads, and SingleReward + residual heads, from the comparison's reported
  number of adaptation pairs per context.

Every readout of one layer reads the same stored backbone readings (`trl_micro.feature_cache`), so the backbone runs
once per pool whatever the number of readouts compared.

    OMP_NUM_THREADS=2 nice -n 10 python -m benchmarks.studies.readout_study --data_dir ../shared/data \\
        --output benchmarks/studies/results/readout_study.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import logging
import sys
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from benchmarks import start_logging, write_study_report
from benchmarks.harness.comparison import (
    adaptation_subset,
    fit_pool_residual_heads,
    micro_online_routing,
    per_context_oracle_margins,
    score,
    single_residual_margins,
    train_heads,
)
from benchmarks.harness.metrics import best_head_accuracy, gap_closed
from benchmarks.harness.plan import add_plan_arguments, benchmark_settings, selected_comparisons, split_for, study_pool
from trl_micro import MiCRoRewardModel
from trl_micro.bundled.catalog import resolve_model_path
from trl_micro.evaluation import per_context_accuracy
from trl_micro.evaluation_reports import ensure_writable, markdown_table
from trl_micro.personalization.adaptation import routed_margins

REPO_ROOT = Path(__file__).resolve().parents[2]

logger = logging.getLogger("benchmarks.studies.readout_study")

REWARD_READOUTS = ("last", "mean", "last_mean")
SINGLE, ORACLE = "SingleReward", "oracle per context"
ROUTED, BEST_HEAD = "MiCRo (context in prompt)", "best MiCRo head per context"
ONLINE, RESIDUAL, SINGLE_RESIDUAL = "MiCRo + online routing", "MiCRo + online + residual", "Single + residual"
METHODS = (SINGLE, ORACLE, ROUTED, BEST_HEAD, ONLINE, RESIDUAL, SINGLE_RESIDUAL)
GAP_METHODS = (ROUTED, BEST_HEAD, ONLINE, RESIDUAL)


def measure(backbone, tokenizer, pool, spec, settings, readout: dict, seed: int) -> dict:
    """Per-context accuracy of every method of the module docstring, one seed."""
    training = dataclasses.replace(settings.heads, readout=readout)
    split = split_for(pool, spec, seed)
    contexts = [pool.context_ids[pair] for pair in split.test]
    single = train_heads(backbone, tokenizer, pool, split.stage1_train, training, seed, num_heads=1)
    micro = train_heads(backbone, tokenizer, pool, split.stage1_train, training, seed, num_heads=settings.num_heads)
    single_test, micro_test = (score(model, pool, split.test, with_context=False) for model in (single, micro))
    pairs = adaptation_subset(pool, split.adaptation, settings.reported_size, seed)
    online = micro_online_routing(micro, pool, pairs, settings.online_eta)
    online_margins = routed_margins(online, contexts, micro_test.head_margins)
    residuals = fit_pool_residual_heads(micro, pool, pairs, online)
    margins = {
        SINGLE: single_test.margins,
        ORACLE: per_context_oracle_margins(backbone, tokenizer, pool, split, training, seed),
        ROUTED: score(micro, pool, split.test, with_context=True).margins,
        ONLINE: online_margins,
        RESIDUAL: online_margins + residuals.rewards(contexts, micro_test.feature_deltas),
        SINGLE_RESIDUAL: single_residual_margins(single, pool, pairs, single_test, contexts),
    }
    accuracy = {name: per_context_accuracy(value, contexts)["accuracy"] for name, value in margins.items()}
    accuracy[BEST_HEAD] = best_head_accuracy(micro_test.head_margins, contexts)["accuracy"]
    return {name: accuracy[name] for name in METHODS}


def summarize(runs: list[dict]) -> dict:
    """Mean and seed spread of each method's macro accuracy, and each gap method's mean gap closed per context."""
    summary = {"macro": {}, "gap_closed": {}}
    for method in METHODS:
        macros = [np.mean(list(run[method].values())) for run in runs]
        summary["macro"][method] = {
            "mean": float(np.mean(macros)),
            "std": float(np.std(macros, ddof=1)) if len(macros) > 1 else 0.0,
        }
    for method in GAP_METHODS:
        summary["gap_closed"][method] = {
            context: float(
                np.nanmean(
                    [gap_closed(run[method][context], run[SINGLE][context], run[ORACLE][context]) for run in runs]
                )
            )
            for context in runs[0][SINGLE]
        }
    return summary


def run_study(args, plan, specs, on_readout=None) -> dict:
    """Every readout on the comparisons `specs` of `plan`; `on_readout(result)` after each readout (to save progress)."""
    model_path = resolve_model_path(plan.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    seeds = plan.seeds
    result = {"date": datetime.date.today().isoformat(), "seeds": seeds, "benchmarks": {}}
    for router_readout in args.router_readouts:
        for reward_readout in args.reward_readouts:
            readout = {"reward_readout": reward_readout, "router_readout": router_readout}
            name = f"{reward_readout} / router {router_readout}"
            feature_model = MiCRoRewardModel.from_backbone(model_path, num_heads=1, **readout).eval()
            pools = {}
            for spec in specs:
                pool = study_pool(pools, plan, spec, feature_model, tokenizer, args)
                gc.freeze()  # see run_all.run_benchmark
                settings = benchmark_settings(plan, spec)
                started = time.perf_counter()
                runs = [
                    measure(feature_model.backbone, tokenizer, pool, spec, settings, readout, seed) for seed in seeds
                ]
                entry = result["benchmarks"].setdefault(
                    spec.name, {"title": spec.title, "heads": settings.heads.describe(), "readouts": {}}
                )
                entry["readouts"][name] = {"runs": runs, **summarize(runs), "seconds": time.perf_counter() - started}
                macro = entry["readouts"][name]["macro"]
                logger.info(
                    "%s, %s: online routing %.3f, SingleReward %.3f, oracle %.3f",
                    spec.title,
                    name,
                    macro[ONLINE]["mean"],
                    macro[SINGLE]["mean"],
                    macro[ORACLE]["mean"],
                )
            del pools, feature_model
            gc.unfreeze()
            gc.collect()
            if on_readout is not None:
                on_readout(result)
    return result


def render(result: dict, command: str) -> str:
    lines = [
        "# Readouts: what the heads and the router read of the backbone",
        "",
        f"Generated {result['date']} by `{command}` (seeds {', '.join(map(str, result['seeds']))}; the embedded "
        "SmolLM2-135M-Instruct, frozen). Macro accuracy over the contexts, mean ± seed spread; 'gap closed' is the "
        "mean over seeds of (method - SingleReward) / (oracle - SingleReward) per context, the oracle trained on the "
        "same features. Adaptation: the comparison's reported number of pairs per context. See the script's "
        "docstring for the methods.",
        "",
    ]
    for entry in result["benchmarks"].values():
        lines += [f"## {entry['title']}", "", f"Heads trained with {entry['heads']}.", ""]
        rows = []
        for name, readout in entry["readouts"].items():
            rows.append(
                [
                    name,
                    *(
                        f"{100 * readout['macro'][m]['mean']:.1f} ± {100 * readout['macro'][m]['std']:.1f}"
                        for m in METHODS
                    ),
                ]
            )
        lines += markdown_table(["readout", *METHODS], rows) + [""]
        rows = []
        for name, readout in entry["readouts"].items():
            for method in GAP_METHODS:
                gaps = readout["gap_closed"][method]
                rows.append([name, method, *(f"{value:.2f}" for value in gaps.values())])
        contexts = list(next(iter(entry["readouts"].values()))["gap_closed"][ONLINE])
        lines += ["Gap closed per context:", ""] + markdown_table(["readout", "method", *contexts], rows) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward_readouts", nargs="+", choices=REWARD_READOUTS, default=list(REWARD_READOUTS))
    parser.add_argument("--router_readouts", nargs="+", choices=("last", "mean"), default=["last"])
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "studies" / "results" / "readout_study.md"))
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    plan, specs = selected_comparisons(args, parser)
    start_logging()
    output = ensure_writable(args.output)

    def save(result):
        write_study_report(output, "benchmarks.studies.readout_study", argv, result, render)

    run_study(args, plan, specs, on_readout=save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
