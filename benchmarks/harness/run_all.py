"""
The whole benchmark in one command: MiCRo against every baseline on hh_relabeled, hh_rlhf, DSP and synthetic
mixtures (M = 2, 4, 8), performance figures, and optionally the same comparison on a LoRA-tuned backbone. Regenerates
BENCHMARKS.md at the repository root, the JSON / Markdown reports and PNG plots under benchmarks/harness/results/,
and the performance scripts' reports under benchmarks/performance/results/.

    OMP_NUM_THREADS=2 nice -n 10 python -m benchmarks.harness.run_all            # frozen backbone (make benchmark)
    OMP_NUM_THREADS=2 nice -n 10 python -m benchmarks.harness.run_all --lora     # + LoRA-tuned backbone

The backbone (the embedded SmolLM2-135M-Instruct unless --model) runs once per pair and form: its features are
cached on disk (`--cache_dir`, default `$TRL_MICRO_CACHE/features`), so later runs skip that part entirely.
`--preset hh_lora` is the one-off LoRA run alone (about an hour on 2 CPU cores: LoRA Stage 1 on all of
hh_relabeled's training pairs that fit in 192 tokens, then the comparison on the frozen and the tuned backbone):

    OMP_NUM_THREADS=2 nice -n 10 python -m benchmarks.harness.run_all --preset hh_lora \
        --output benchmarks/harness/results/hh_lora/REPORT.md --results_dir benchmarks/harness/results/hh_lora

`--preset smoke` is a seconds-long run on tiny pools, for tests (with `--model` a tiny checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from transformers import AutoTokenizer

from benchmarks import command_line, start_logging
from benchmarks.harness.comparison import compare_methods, leave_one_context_out
from benchmarks.harness.embedded_reports import RL, SERVICE, STUDIES, refresh_section
from benchmarks.harness.lora_backbone import default_lora_tuning, tune_backbone_with_lora
from benchmarks.harness.pair_pool import CachedPairPool, build_pair_pool
from benchmarks.harness.plan import (
    PRESETS,
    REPO_ROOT,
    BenchmarkPlan,
    BenchmarkSpec,
    add_input_arguments,
    benchmark_settings,
    build_pool,
    split_for,
)
from benchmarks.harness.preference_pools import load_pool_dataset
from benchmarks.harness.report import (
    BenchmarkOutcome,
    load_outcome,
    outcome_files,
    render_document,
    write_outcome_files,
)
from benchmarks.performance.figures import run_reward_overhead, run_script, time_stage1_epoch
from trl_micro import MiCRoRewardModel
from trl_micro.bundled.catalog import resolve_model_path
from trl_micro.evaluation_reports import to_jsonable

logger = logging.getLogger("benchmarks")


# --------------------------------------------------------------------------------------------------------------- steps
@dataclass
class Timings:
    pools: dict = field(default_factory=dict)
    benchmarks: dict = field(default_factory=dict)
    performance: float = 0.0
    lora: float = 0.0
    total: float = 0.0


class Pools(dict):
    """The plan's pools with their features, each built on first use (a resumed comparison's pool is never built)."""

    def __init__(self, plan, model, tokenizer, args, timings):
        super().__init__()
        self.plan, self.model, self.tokenizer, self.args, self.timings = plan, model, tokenizer, args, timings

    def __missing__(self, name: str) -> CachedPairPool:
        args = self.args
        pool = build_pool(name, self.plan.pools[name], self.model, self.tokenizer, args.cache_dir, args.data_dir)
        self.timings.pools[name] = pool.build_seconds
        self[name] = pool
        return pool


def comparison_settings(plan: BenchmarkPlan, spec: BenchmarkSpec) -> dict:
    """What a comparison's outcome depends on besides the code: `--resume` reuses an outcome recorded with these."""
    settings = {
        "model": plan.model,
        "seeds": plan.seeds,
        "spec": spec,
        "pool": plan.pools[spec.pool],
        "comparison": benchmark_settings(plan, spec),
    }
    return json.loads(json.dumps(to_jsonable(settings)))


def resumed_outcome(spec: BenchmarkSpec, plan: BenchmarkPlan, results_dir: Path) -> tuple[BenchmarkOutcome, str] | None:
    """The outcome `results_dir` records for `spec` under the same settings and when it ran, or None (then it runs)."""
    path = outcome_files(results_dir, spec.name)["json"]
    loaded = load_outcome(path) if path.exists() else None
    if loaded is None or loaded[1]["settings"] != comparison_settings(plan, spec):
        return None
    logger.info("%s: reusing the outcome recorded on %s (%s)", spec.name, loaded[1]["generated"], path)
    return loaded[0], loaded[1]["generated"]


def run_benchmark(
    spec: BenchmarkSpec, pool: CachedPairPool, backbone, tokenizer, plan, description, seeds=None
) -> BenchmarkOutcome:
    # Every training ends with accelerate's gc.collect(): keep it from scanning the long-lived objects (pools,
    # datasets, the backbone) dozens of times; it otherwise costs more than the training itself.
    gc.freeze()
    seeds = seeds or plan.seeds
    contexts = spec.contexts or tuple(sorted(set(pool.context_ids)))
    settings = benchmark_settings(plan, spec)
    started = time.perf_counter()
    runs = []
    for seed in seeds:
        split = split_for(pool, spec, seed)
        logger.info(
            "%s, seed %d: %d train / %d adaptation / %d test pairs",
            spec.name,
            seed,
            len(split.train),
            len(split.adaptation),
            len(split.test),
        )
        runs.append(compare_methods(backbone, tokenizer, pool, split, settings, seed))
    leave_one_out = {}
    if spec.leave_one_out:
        for context in contexts:
            split = split_for(pool, spec, seeds[0], held_out_context=context)
            leave_one_out[context] = leave_one_context_out(backbone, tokenizer, pool, split, settings, seeds[0])
            logger.info("%s without %s in Stage 1: done", spec.name, context)
    split = split_for(pool, spec, 0)
    if spec.adaptation_share is None:
        draw = (
            f"{spec.adaptation_per_context} adaptation and {spec.test_per_context} test pairs per context drawn "
            "from the evaluation pairs"
        )
    else:
        draw = (
            f"the evaluation queries split {spec.adaptation_share:.0%} adaptation (up to "
            f"{max(settings.adaptation_sizes)} pairs per context drawn from them) / {1 - spec.adaptation_share:.0%} "
            f"test (every pair; {len(split.test) // len(contexts)} per context in seed 0), never splitting a query"
        )
    return BenchmarkOutcome(
        name=spec.name,
        title=spec.title,
        description=(
            f"Pool: {description}. Contexts: {', '.join(contexts)}. Per seed: {len(split.train) // len(contexts)} "
            f"training pairs per context (the same for every seed), {draw}. K = {spec.num_heads}. Heads trained with "
            f"{settings.heads.describe()}."
        ),
        num_heads=spec.num_heads,
        seeds=list(seeds),
        runs=runs,
        target=spec.target,
        seconds=time.perf_counter() - started,
        reported_adaptation=settings.reported_size,
        leave_one_out=leave_one_out,
    )


def measure_performance(plan, model_path, tokenizer, context_template: str, data_dir, results_dir: Path) -> dict:
    """Stage 1 epoch time (slow path vs cache) on the synthetic pool's pairs, and the performance scripts' figures.

    Each script's report goes to `results_dir` (benchmarks/performance/results/ by default, where the scripts keep
    theirs), and a GPU report found there is embedded as it is."""
    name = "synthetic" if "synthetic" in plan.pools else next(iter(plan.pools))
    dataset, _ = load_pool_dataset(plan.pools[name], tokenizer, context_template, data_dir)  # no backbone pass
    rows = dataset.select(range(min(plan.performance_pairs, len(dataset))))
    pairs = Dataset.from_dict({column: rows[column] for column in ("prompt", "chosen", "rejected")})
    epoch = time_stage1_epoch(model_path, tokenizer, pairs)
    overhead = run_reward_overhead(
        plan.overhead_completions, plan.overhead_repetitions, results_dir / "reward_overhead.md"
    )
    performance = {
        "epoch": epoch,
        "epoch_data": "synthetic" if name == "synthetic" else "first pool",
        "overhead": overhead,
    }
    for name, arguments in plan.performance_scripts.items():
        # "embedded" rather than its resolved local path: the reports quote their command line.
        model = plan.model if plan.model == "embedded" else model_path
        performance[name] = run_script(name, results_dir / f"{name}.md", "--model", model, *arguments)
    gpu_report = results_dir / "gpu_performance.md"
    performance["gpu_performance"] = gpu_report.read_text(encoding="utf-8") if gpu_report.exists() else None
    return performance


def run_lora(plan, model_path, tokenizer, pools, frozen_backbone, args) -> dict:
    """LoRA Stage 1 on the LoRA benchmark's training pairs, then the comparison on the tuned and the frozen backbone."""
    spec = next(bench for bench in plan.benchmarks if bench.name == plan.lora_benchmark)
    tuning = plan.lora_tuning or default_lora_tuning()
    pool = pools[spec.pool]
    contexts = spec.contexts or tuple(sorted(set(pool.context_ids)))
    train = split_for(pool, spec, 0).train
    if tuning.train_pairs_per_context is not None:
        train = [
            pair
            for context in contexts
            for pair in pool.pairs_of_context(train, context)[: tuning.train_pairs_per_context]
        ]
    evaluation = [pair for pair in range(pool.num_with_context) if pool.context_ids[pair] in contexts]
    frozen_pool = pool.subset(evaluation + sorted(train))
    train_text = frozen_pool.dataset.select(range(frozen_pool.num_with_context, len(frozen_pool)))
    train_text = Dataset.from_dict({column: train_text[column] for column in ("prompt", "chosen", "rejected")})

    started = time.perf_counter()
    tuned = tune_backbone_with_lora(model_path, tokenizer, train_text, spec.num_heads, tuning, seed=plan.seeds[0])
    tuning_seconds = time.perf_counter() - started
    tuned_pool = build_pair_pool(
        tuned, tokenizer, frozen_pool.dataset, cache_dir=args.cache_dir, num_with_context=frozen_pool.num_with_context
    )
    pool_description = (
        f"{plan.pools[spec.pool].describe()}; LoRA run: {len(train) // len(contexts)} training pairs per context"
    )
    outcomes = {}
    runs = (("frozen", "frozen", frozen_backbone, frozen_pool), ("LoRA-tuned", "tuned", tuned.backbone, tuned_pool))
    for label, suffix, backbone, lora_pool in runs:
        lora_spec = replace(spec, name=f"{spec.name}_lora_{suffix}", title=f"{spec.title}, {label} backbone (LoRA run)")
        outcomes[label] = run_benchmark(
            lora_spec, lora_pool, backbone, tokenizer, plan, pool_description, seeds=plan.lora_seeds
        )
    return {
        "tuning": tuning,
        "tuning_seconds": tuning_seconds,
        "feature_seconds": tuned_pool.build_seconds,
        "outcomes": outcomes,
        "train_pairs_per_context": len(train) // len(contexts),
    }


# ------------------------------------------------------------------------------------------------------------ machine
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    import peft
    import trl

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(memory_gib, 1) if memory_gib else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "nice": os.nice(0) if hasattr(os, "nice") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
    }


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full", help="Benchmark size (default: full).")
    parser.add_argument("--model", default=None, help="Backbone path, or 'embedded' (default of the presets).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Seeds (default: the preset's, 0 1 2).")
    parser.add_argument("--lora", action="store_true", help="Also run the comparison on a LoRA-tuned backbone.")
    parser.add_argument("--skip_performance", action="store_true", help="Leave out the performance figures.")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="Run only these benchmarks of the plan (e.g. dsp); the report covers only them.",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Reuse each comparison whose JSON report in --results_dir records the same settings (the library code is "
        "not compared: rerun without it after changing the library); the others run, building only their pools.",
    )
    parser.add_argument(
        "--refresh_reports",
        action="store_true",
        help="Only re-embed the plan's study and RL reports into their sections of --output; run nothing else.",
    )
    parser.add_argument("--output", default=str(REPO_ROOT / "BENCHMARKS.md"), help="The Markdown report to write.")
    parser.add_argument(
        "--results_dir",
        default=str(REPO_ROOT / "benchmarks" / "harness" / "results"),
        help="Folder of the per-benchmark JSON/Markdown reports and PNG plots.",
    )
    parser.add_argument(
        "--performance_dir",
        default=str(REPO_ROOT / "benchmarks" / "performance" / "results"),
        help="Folder of the performance scripts' reports (reward_overhead, grpo_step, feature_store, serving).",
    )
    add_input_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    start_logging()
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    plan = PRESETS[args.preset]()
    plan.model = args.model or plan.model
    plan.seeds = args.seeds or plan.seeds
    studies = [REPO_ROOT / path for path in plan.studies]
    rl_reports = [REPO_ROOT / path for path in plan.rl_reports]
    service_reports = [REPO_ROOT / path for path in plan.service_reports]
    if args.refresh_reports:
        refresh_section(Path(args.output), STUDIES, studies)
        refresh_section(Path(args.output), RL, rl_reports, after=STUDIES)
        if service_reports:
            refresh_section(Path(args.output), SERVICE, service_reports, after=RL)
        logger.info(
            "Re-embedded %d study, %d RL and %d serving reports in %s",
            len(studies), len(rl_reports), len(service_reports), args.output,
        )  # fmt: skip
        return 0
    if args.only:
        unknown = sorted(set(args.only) - {spec.name for spec in plan.benchmarks})
        if unknown:
            raise ValueError(f"--only {unknown}: not benchmarks of the {args.preset} plan.")
        plan.benchmarks = [spec for spec in plan.benchmarks if spec.name in args.only]
        plan.pools = {name: pool for name, pool in plan.pools.items() if any(s.pool == name for s in plan.benchmarks)}
    output, results_dir = Path(args.output), Path(args.results_dir)
    from trl_micro.evaluation_reports import ensure_writable

    ensure_writable(output)
    ensure_writable(results_dir / "probe.json")

    timings = Timings()
    model_path = resolve_model_path(plan.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    feature_model = MiCRoRewardModel.from_backbone(model_path, num_heads=1).eval()
    pools = Pools(plan, feature_model, tokenizer, args, timings)

    setup = {"plan": dataclasses.asdict(plan), "argv": argv}
    outcomes, resumed = [], {}
    for spec in [] if plan.lora_only else plan.benchmarks:
        reused = resumed_outcome(spec, plan, results_dir) if args.resume else None
        if reused is not None:
            outcomes.append(reused[0])
            resumed[spec.name] = reused[1]
            continue
        outcome = run_benchmark(
            spec, pools[spec.pool], feature_model.backbone, tokenizer, plan, plan.pools[spec.pool].describe()
        )
        generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        write_outcome_files(outcome, results_dir, setup, comparison_settings(plan, spec), generated)
        timings.benchmarks[spec.name] = outcome.seconds
        outcomes.append(outcome)
        logger.info("%s done in %.0f s", spec.name, outcome.seconds)

    performance = None
    if not (args.skip_performance or plan.lora_only):
        step = time.perf_counter()
        context_template = feature_model.config.context_template
        performance = measure_performance(
            plan, model_path, tokenizer, context_template, args.data_dir, Path(args.performance_dir)
        )
        timings.performance = time.perf_counter() - step

    lora = None
    if args.lora or plan.lora_only:
        step = time.perf_counter()
        lora = run_lora(plan, model_path, tokenizer, pools, feature_model.backbone, args)
        for outcome in lora["outcomes"].values():
            write_outcome_files(outcome, results_dir, setup)
        timings.lora = time.perf_counter() - step

    timings.total = time.perf_counter() - started
    document = render_document(
        plan=plan,
        outcomes=outcomes,
        performance=performance,
        lora=lora,
        timings=timings,
        machine={**machine_info(), "load_average_start": load_at_start, "load_average_end": os.getloadavg()},
        command=command_line("benchmarks.harness.run_all", argv),
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        output=output,
        studies=studies,
        rl_reports=rl_reports,
        service_reports=service_reports,
        resumed=resumed,
    )
    output.write_text(document, encoding="utf-8")
    logger.info("Wrote %s (total %.0f s)", output, timings.total)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
