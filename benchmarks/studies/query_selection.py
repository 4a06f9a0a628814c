"""
Which pairs should a new user label? Online routing from pairs chosen by the library's query selection against random
ones, on the comparisons of BENCHMARKS.md.

For every comparison and seed this trains MiCRo Stage 1 as the comparison does (the library's defaults and the
comparison's head training), then, per context, asks pairs of the comparison's adaptation pool one at a time
(`trl_micro.personalization.query_selection.choose_pairs_to_label`: `information` = BALD, `disagreement`, `random`), each answer
updating the context's online router, and reports online routing (and online routing + residual heads fitted on the
same pairs) on the test pairs after 2, 4, 8, 16 and 32 questions. The pairs asked are a pool's labelled pairs, their
labels revealed only once asked; one pass of the backbone over the pool, as in use. Writes a Markdown and a JSON
report and a plot of macro accuracy against questions asked, and for each comparison's K the time to rank a pool of
`--ranking_candidates` (10,000) candidates from stored margins, and to choose a batch of 8 of them at once.

    OMP_NUM_THREADS=2 nice -n 10 python -m benchmarks.studies.query_selection --data_dir ../shared/data \\
        --benchmarks synthetic_m2 synthetic_m4 synthetic_m8 dsp --output benchmarks/studies/results/query_selection.md
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from benchmarks import start_logging, write_study_report
from benchmarks.harness.comparison import score, train_heads
from benchmarks.harness.metrics import plot_adaptation_curves
from benchmarks.harness.plan import add_plan_arguments, benchmark_settings, selected_comparisons, split_for, study_pool
from trl_micro import MiCRoRewardModel
from trl_micro.bundled.catalog import resolve_model_path
from trl_micro.evaluation import per_context_accuracy
from trl_micro.evaluation_reports import ensure_writable, markdown_table
from trl_micro.personalization.adaptation import fit_online_router, fit_residual_heads, routed_margins, router_priors
from trl_micro.personalization.query_selection import (
    QUERY_STRATEGIES,
    choose_pairs_to_label,
    expected_information,
    head_disagreement,
    select_queries,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

logger = logging.getLogger("benchmarks.studies.query_selection")

BUDGETS = (2, 4, 8, 16, 32)
ONLINE, RESIDUAL = "online routing", "online + residual"


def measure(backbone, tokenizer, pool, spec, settings, seed: int, budgets, strategies) -> dict:
    """`{strategy: {method: {budget: {context: accuracy}}}}` for one seed, and the elapsed selection time."""
    split = split_for(pool, spec, seed)
    micro = train_heads(
        backbone, tokenizer, pool, split.stage1_train, settings.heads, seed, num_heads=settings.num_heads
    )
    test_contexts = [pool.context_ids[pair] for pair in split.test]
    test = score(micro, pool, split.test, with_context=False)
    candidates = list(split.adaptation)
    contexts = [pool.context_ids[pair] for pair in candidates]
    fewest = min(contexts.count(context) for context in set(contexts))
    usable = [budget for budget in budgets if budget <= fewest]
    candidate_scores = score(micro, pool, candidates, with_context=False)
    priors = router_priors(contexts, score(micro, pool, candidates, with_context=True).mixture_weights)
    result, selection_seconds = {}, {}
    for strategy in strategies:
        started = time.perf_counter()
        asked = choose_pairs_to_label(
            contexts, candidate_scores.head_margins, max(usable), strategy, priors, settings.online_eta, seed
        )
        selection_seconds[strategy] = time.perf_counter() - started
        per_context = {context: [row for row in asked if contexts[row] == context] for context in sorted(set(contexts))}
        result[strategy] = {ONLINE: {}, RESIDUAL: {}}
        for budget in usable:
            rows = [row for context_rows in per_context.values() for row in context_rows[:budget]]
            labelled = [contexts[row] for row in rows]
            margins = candidate_scores.head_margins[rows]
            router = fit_online_router(labelled, margins, priors, settings.online_eta)
            online = routed_margins(router, test_contexts, test.head_margins)
            result[strategy][ONLINE][budget] = per_context_accuracy(online, test_contexts)["accuracy"]
            if budget >= 2:  # residual heads cross-validate their L2 weight: 2 pairs per context at least
                residuals = fit_residual_heads(router, labelled, margins, candidate_scores.feature_deltas[rows])
                with_residual = online + residuals.rewards(test_contexts, test.feature_deltas)
                result[strategy][RESIDUAL][budget] = per_context_accuracy(with_residual, test_contexts)["accuracy"]
    return {"accuracy": result, "selection_seconds": selection_seconds, "candidates_per_context": fewest}


def ranking_seconds(num_candidates: int, num_heads: int, repetitions: int = 5, batch: int = 8) -> dict:
    """Median seconds to score and rank `num_candidates` stored margins (K = `num_heads`) by each rule, and to choose
    a batch of `batch` at once (`select_queries`); margins and posterior are random, as timing does not depend on them."""
    rng = np.random.default_rng(0)
    margins = rng.normal(scale=2.0, size=(num_candidates, num_heads))
    weights = rng.dirichlet(np.ones(num_heads))
    timed = {
        "information": lambda: np.argsort(-expected_information(margins, weights)),
        "disagreement": lambda: np.argsort(-head_disagreement(margins, weights)),
        f"information, batch of {batch}": lambda: select_queries(margins, weights, batch, "information"),
    }
    seconds = {}
    for name, rank in timed.items():
        runs = []
        for _ in range(repetitions):
            started = time.perf_counter()
            rank()
            runs.append(time.perf_counter() - started)
        seconds[name] = float(np.median(runs))
    return seconds


def summarize(runs: list[dict]) -> dict:
    """`{strategy: {method: {budget: {"mean", "std", "per_context"}}}}` of the macro accuracy over seeds."""
    summary = {}
    for strategy, methods in runs[0]["accuracy"].items():
        for method, budgets in methods.items():
            for budget in budgets:
                per_seed = [run["accuracy"][strategy][method][budget] for run in runs]
                macros = [float(np.mean(list(accuracy.values()))) for accuracy in per_seed]
                summary.setdefault(strategy, {}).setdefault(method, {})[budget] = {
                    "mean": float(np.mean(macros)),
                    "std": float(np.std(macros, ddof=1)) if len(macros) > 1 else 0.0,
                    "per_context": {c: float(np.mean([a[c] for a in per_seed])) for c in per_seed[0]},
                }
    return summary


def run_study(args, plan, specs, on_benchmark=None) -> dict:
    model_path = resolve_model_path(plan.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    feature_model = MiCRoRewardModel.from_backbone(model_path, num_heads=1).eval()
    seeds = plan.seeds
    result = {
        "date": datetime.date.today().isoformat(),
        "seeds": seeds,
        "budgets": list(args.budgets),
        "benchmarks": {},
    }
    pools = {}
    for spec in specs:
        pool = study_pool(pools, plan, spec, feature_model, tokenizer, args)
        settings = benchmark_settings(plan, spec)
        started = time.perf_counter()
        runs = [
            measure(feature_model.backbone, tokenizer, pool, spec, settings, seed, args.budgets, args.strategies)
            for seed in seeds
        ]
        result["benchmarks"][spec.name] = {
            "title": spec.title,
            "heads": settings.heads.describe(),
            "runs": runs,
            "summary": summarize(runs),
            "seconds": time.perf_counter() - started,
            "ranking": {
                "candidates": args.ranking_candidates,
                "num_heads": settings.num_heads,
                "seconds": ranking_seconds(args.ranking_candidates, settings.num_heads),
            },
        }
        logger.info("%s done in %.0f s", spec.title, time.perf_counter() - started)
        if on_benchmark is not None:
            on_benchmark(result)
    return result


def render(result: dict, command: str, plot: str | None = None) -> str:
    lines = [
        "# Query selection: which pairs a new user should label",
        "",
        f"Generated {result['date']} by `{command}` (seeds {', '.join(map(str, result['seeds']))}; the embedded "
        "SmolLM2-135M-Instruct, frozen). Macro test accuracy (%) of MiCRo + online routing, and of online routing + "
        "residual heads fitted on the same pairs, after that many questions per context; mean ± seed spread. The "
        "questions come from the comparison's adaptation pool, asked one at a time, each answer updating the "
        "context's posterior. See the script's docstring.",
        "",
    ]
    if plot:
        lines += [f"![Macro accuracy against questions asked]({plot})", ""]
    for entry in result["benchmarks"].values():
        summary = entry["summary"]
        budgets = sorted({budget for methods in summary.values() for budget in methods[ONLINE]}, key=int)
        seconds = np.mean([run["selection_seconds"].get("information", 0.0) for run in entry["runs"]])
        lines += [
            f"## {entry['title']}",
            "",
            f"Heads trained with {entry['heads']}. Candidates per context: "
            f"{entry['runs'][0]['candidates_per_context']}; choosing 32 by information took {seconds:.2f} s "
            "per seed, all contexts.",
            "",
        ]
        if "ranking" in entry:
            ranking = entry["ranking"]
            timings = ", ".join(f"{name} {1000 * value:.1f} ms" for name, value in ranking["seconds"].items())
            lines += [
                f"Ranking {ranking['candidates']:,} candidates from stored margins (K = {ranking['num_heads']}, "
                f"median of 5): {timings}.",
                "",
            ]
        rows = []
        for method in (ONLINE, RESIDUAL):
            for strategy, methods in summary.items():
                cells = [
                    f"{100 * methods[method][b]['mean']:.1f} ± {100 * methods[method][b]['std']:.1f}"
                    if b in methods[method]
                    else ""
                    for b in budgets
                ]
                rows.append([method, strategy, *cells])
        lines += markdown_table(["method", "questions chosen by", *map(str, budgets)], rows) + [""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    rows = []
    for entry in result["benchmarks"].values():
        for strategy, methods in entry["summary"].items():
            for budget, value in methods[ONLINE].items():
                rows.append(
                    {
                        "method": strategy,
                        "context": entry["title"],
                        "num_pairs": int(budget),
                        "accuracy": value["mean"],
                        "accuracy_std": value["std"],
                    }
                )
    return plot_adaptation_curves(
        rows, path, title="MiCRo + online routing: macro accuracy", xlabel="questions asked per context"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", choices=QUERY_STRATEGIES, default=list(QUERY_STRATEGIES))
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="Questions per context.")
    parser.add_argument(
        "--ranking_candidates", type=int, default=10_000, help="Pool size of the ranking-time figure (default 10,000)."
    )
    parser.add_argument(
        "--output", default=str(REPO_ROOT / "benchmarks" / "studies" / "results" / "query_selection.md")
    )
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    plan, specs = selected_comparisons(args, parser)
    start_logging()
    output = ensure_writable(args.output)
    figure = output.with_suffix(".png")

    def save(result):
        plot(result, figure)
        write_study_report(
            output,
            "benchmarks.studies.query_selection",
            argv,
            result,
            lambda r, command: render(r, command, figure.name),
        )

    run_study(args, plan, specs, on_benchmark=save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
