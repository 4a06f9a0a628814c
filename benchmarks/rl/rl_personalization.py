"""
RL personalization benchmark: does GRPO against MiCRo's routed reward personalize a policy, context by context, and
how does it compare with GRPO against one Bradley-Terry reward?

The same policy (a LoRA adapter on the embedded SmolLM2-135M-Instruct) is trained three ways by TRL's GRPOTrainer,
with the same prompts, steps and seeds:

    micro    against MiCRoReward, routed by each prompt's context id through Stage 2 state (online router + residual
             heads) fitted on a few labelled pairs per context
    single   against SingleReward (one BT head) trained on the same Stage 1 pairs
    gold     against the gold reward itself: the ceiling

The rewards are built by `benchmarks/rl/personalization_rewards.py` (the gold: one oracle head per context, trained with
the context labels on pairs no other reward saw). Two scenarios (`--scenario`), the prompts showing their context as the
system message, so the policy can answer each context differently:

    synthetic  the synthetic subpopulations `--num_contexts` (2: a busy engineer who wants short, casual answers; a
               professor who wants long, formal ones)
    dsp        DSP's queries answered for the readers of `--domains` (academy and entertainment by default, whose
               preferences reverse exactly), each domain's description as the system message; Stage 1 on DSP pairs
               without context, Stage 2 from 32 labelled pairs per domain, training and held-out prompts from
               disjoint queries

Held-out prompts (under every context) are sampled at step 0 and every `--eval_every` steps and judged by each
context's gold reward: the gold mean, the win rate over the initial policy's samples, tokens and the share cut at the
completion budget, and the cross-context matrix (`benchmarks/rl/gold_evaluation.py`), with the KL to the initial
policy that TRL logs (`--beta` > 0).

    python -m benchmarks.rl.rl_personalization --scenario synthetic --threads 2 --resume \
        --cache_dir ~/.cache/trl_micro/rl-personalization-synthetic
    python -m benchmarks.rl.rl_personalization --scenario dsp --threads 2 --resume \
        --cache_dir ~/.cache/trl_micro/rl-personalization --data_dir ../shared/data
                                    # the real runs: 3 methods x 2 seeds, 25-40 min each on 2 CPU cores
    python -m benchmarks.rl.rl_personalization --preset smoke [--scenario dsp]   # tiny random models, seconds

Writes under `--output_dir` (default benchmarks/rl/results/): rl_personalization.md and .json (rl_personalization_dsp.*
for DSP: the table, curves, matrix, reward accuracies, settings and the command), one PNG of curves per context, kl.png,
and runs/<scenario>-<method>-seed<k>.json per run; with `--resume`, a run whose file holds the same settings is not
run again. `--report_only` writes the report from the finished runs alone and names the runs still missing, so a
comparison cut short by the machine's time can be reported as far as it went.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, set_seed
from trl import GRPOConfig, GRPOTrainer

from benchmarks import command_line, default_data_dir
from benchmarks.rl.gold_evaluation import GoldEvaluation, add_logged_kl
from benchmarks.rl.personalization_rewards import (
    CPU_RUN,
    DSPRewardSetup,
    RewardSetup,
    build_rewards,
    draw_dsp_pools,
)
from benchmarks.rl.policy_inputs import CONTEXT_TEMPLATE, dsp_prompts, load_models, prompt_splits
from benchmarks.rl.rl_personalization_report import write_outputs
from trl_micro.evaluation_reports import markdown_table, to_jsonable, write_report
from trl_micro.scripts.rl_utils import sample_completions

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("micro", "single", "gold")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

# Each setting's default under the two presets (smoke, full):
# - smoke: tiny random policy and reward backbone, a test of the pipeline, not a result.
# - full: the embedded SmolLM2-135M-Instruct as policy and reward backbone. The budget of 128 tokens leaves each taste
#   room: the synthetic long style runs to 61 tokens on average (100 at most), DSP's styled answers to a median of
#   137-160 tokens whose style shows in their first sentences, while the initial policy, let run, writes about 200
#   (results/initial_lengths*.md); 48 tokens cut 90% of its answers and every long-style one. Steps: at 48 tokens a
#   step of 16 completions took about 29 s on the shared 2-core machine (one thread) and an evaluation sample 0.5 s;
#   at 128 tokens 31-40 s with two threads (DSP's longer prompts 42-55), so 32 steps and three evaluations make a
#   run of 22-28 min (DSP 30-39; results/rl_personalization*.md, "Runs"). At learning rate
#   1e-3 the KL to the initial policy was still about 0.06 after 30 steps (no collapse), and 5e-4 barely moved it
#   in 20. The reward pools' backbone features take 10-20 min (synthetic) or about 30 (DSP) once per --cache_dir.
PRESET_SETTINGS = {
    "models": ("tiny", "embedded"),
    "seeds": ([0, 1], [0, 1]),
    "max_steps": (4, 32),
    "eval_every": (2, 16),
    "prompts_per_step": (2, 4),
    "num_generations": (2, 4),
    "max_completion_length": (8, 128),
    "learning_rate": (1e-3, 1e-3),
    "beta": (0.04, 0.04),
    "temperature": (1.0, 1.0),
    "lora_r": (4, 16),
    "lora_alpha": (8, 32),
    "eval_prompts": (2, 16),
    "eval_samples": (2, 4),
    "reference_samples": (2, 4),
    "stage1_pairs": (24, 200),
    "adaptation_pairs": (4, 32),
    "gold_pairs": (24, 400),
    "test_pairs": (8, 100),
    "reward_epochs": (3, 30),
}
PRESETS = {
    preset: {name: values[column] for name, values in PRESET_SETTINGS.items()}
    for column, preset in enumerate(("smoke", "full"))
}
# The DSP scenario's sizes, over the preset's GRPO settings: Stage 1 reads 300 queries' pairs (4800, every domain),
# the gold 200 queries' pairs per domain (800), the test pairs and held-out prompts come from 100 other queries.
DSP_PRESETS = {
    "smoke": dict(stage1_queries=6, adaptation_queries=4, gold_queries=6, test_queries=4),
    "full": dict(stage1_queries=300, adaptation_queries=40, gold_queries=200, test_queries=100),
}
RUN_SETTINGS = (  # what a run's result depends on, besides its method and seed (checked by --resume)
    "scenario",
    "domains",
    "stage1_queries",
    "adaptation_queries",
    "gold_queries",
    "test_queries",
    "preset",
    "models",
    "num_contexts",
    "max_steps",
    "eval_every",
    "prompts_per_step",
    "num_generations",
    "max_completion_length",
    "learning_rate",
    "beta",
    "temperature",
    "lora_r",
    "lora_alpha",
    "eval_prompts",
    "eval_samples",
    "reference_samples",
    "stage1_pairs",
    "adaptation_pairs",
    "gold_pairs",
    "test_pairs",
    "reward_epochs",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="full", help="Defaults of every setting below.")
    parser.add_argument("--models", choices=["embedded", "tiny"], help="SmolLM2-135M, or tiny random models.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, help="GRPO seeds; every method runs with each.")
    parser.add_argument("--scenario", choices=["synthetic", "dsp"], default="synthetic", help="See the docstring.")
    parser.add_argument("--num_contexts", type=int, default=2, help="Synthetic subpopulations (contexts).")
    parser.add_argument(
        "--domains", nargs="+", default=["academy", "entertainment"], help="DSP: the readers the policy serves."
    )
    parser.add_argument("--stage1_queries", type=int, help="DSP: queries of the Stage 1 pairs and training prompts.")
    parser.add_argument("--adaptation_queries", type=int, help="DSP: queries the Stage 2 pairs are drawn from.")
    parser.add_argument("--gold_queries", type=int, help="DSP: queries of each domain's gold pairs.")
    parser.add_argument("--test_queries", type=int, help="DSP: queries of the test pairs and held-out prompts.")
    parser.add_argument("--data_dir", default=default_data_dir(), help="Real data folder (DSP).")
    parser.add_argument("--max_steps", type=int, help="GRPO steps per run.")
    parser.add_argument("--eval_every", type=int, help="Evaluate the policy every this many steps.")
    parser.add_argument("--prompts_per_step", type=int, help="Prompts per GRPO step (each gets num_generations).")
    parser.add_argument("--num_generations", type=int, help="GRPO group size: completions per prompt.")
    parser.add_argument("--max_completion_length", type=int, help="Tokens per completion (training and evaluation).")
    parser.add_argument("--learning_rate", type=float, help="AdamW learning rate of the LoRA adapter.")
    parser.add_argument("--beta", type=float, help="KL coefficient of GRPO (> 0 logs the KL to the initial policy).")
    parser.add_argument("--temperature", type=float, help="Sampling temperature (training and evaluation).")
    parser.add_argument("--lora_r", type=int, help="LoRA rank.")
    parser.add_argument("--lora_alpha", type=int, help="LoRA alpha.")
    parser.add_argument("--eval_prompts", type=int, help="Held-out prompts, each evaluated under every context.")
    parser.add_argument("--eval_samples", type=int, help="Samples per held-out prompt at each evaluation.")
    parser.add_argument("--reference_samples", type=int, help="Samples per held-out prompt of the initial policy.")
    parser.add_argument("--stage1_pairs", type=int, help="Stage 1 pairs per context (MiCRo and SingleReward).")
    parser.add_argument("--adaptation_pairs", type=int, help="Labelled pairs per context for Stage 2.")
    parser.add_argument("--gold_pairs", type=int, help="Pairs per context the gold heads train on.")
    parser.add_argument("--test_pairs", type=int, help="Pairs per context that measure the rewards' accuracy.")
    parser.add_argument("--reward_epochs", type=int, help="Training epochs of every reward head.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--cache_dir", default=None, help="Feature cache and scratch (default: a temporary folder).")
    parser.add_argument("--output_dir", default=str(RESULTS), help="Where the report, plots and runs are written.")
    parser.add_argument("--resume", action="store_true", help="Skip runs whose result file has the same settings.")
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="Train nothing: write the report from the finished runs of --methods x --seeds (as --resume finds them) "
        "and name the missing ones.",
    )
    parser.add_argument(
        "--probe_lengths",
        type=int,
        default=None,
        help="Only sample the initial policy on the held-out prompts at this budget and report its answers' lengths.",
    )
    preset = parser.parse_known_args(argv)[0].preset
    parser.set_defaults(preset=preset, **PRESETS[preset], **DSP_PRESETS[preset])
    args = parser.parse_args(argv)
    if args.scenario == "synthetic":  # the DSP sizes do not apply: keep them out of the settings --resume compares
        args.domains = args.stage1_queries = args.adaptation_queries = args.gold_queries = args.test_queries = None
    else:
        args.num_contexts = len(args.domains)
    for name in (
        "max_steps",
        "eval_every",
        "prompts_per_step",
        "num_generations",
        "eval_prompts",
        "eval_samples",
        "reference_samples",
        "num_contexts",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.num_generations < 2:
        parser.error(f"--num_generations must be >= 2 (GRPO compares completions), got {args.num_generations}.")
    return args


# ------------------------------------------------------------------------------------------------------- runs
def grpo_config(args, seed: int, output_dir: str, reward_weights: list[float]) -> GRPOConfig:
    return GRPOConfig(
        reward_weights=reward_weights,
        output_dir=output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        learning_rate=args.learning_rate,
        beta=args.beta,
        activation_checkpointing=False,  # small models on CPU: memory is not the limit, time is
        logging_steps=1,
        seed=seed,
        **CPU_RUN,
    )


def train_policy(method, reward, seed, args, policy_path, train_prompts, evaluation, scratch) -> dict:
    """
    One GRPO run; returns its evaluation points, its logged metrics and its timings. The gold reward rides along with
    weight 0 (it does not change the advantages) to log its mean per context on the training samples of every step.
    """
    evaluation.start_run()
    set_seed(seed)  # the LoRA adapter's initialization too
    reward_funcs = [reward] if reward is evaluation.gold else [reward, evaluation.gold]
    weights = [1.0] + [0.0] * (len(reward_funcs) - 1)
    trainer = GRPOTrainer(
        model=policy_path,
        reward_funcs=reward_funcs,
        args=grpo_config(args, seed, os.path.join(scratch, f"{method}-{seed}"), weights),
        train_dataset=train_prompts,
        peft_config=LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
        ),
        callbacks=[evaluation],
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    add_logged_kl(evaluation.points, trainer.state.log_history)
    logged = ("step", "reward", "kl", "entropy", "completions/mean_length", f"rewards/{reward.__name__}/mean")
    return {
        "method": method,
        "seed": seed,
        "points": evaluation.points,
        "reference": evaluation.reference_summary(),
        "log": [
            {key: value for key, value in entry.items() if key in logged or key.startswith("gold/")}
            for entry in trainer.state.log_history
        ],
        "seconds": seconds,
        "evaluation_seconds": evaluation.seconds,
        "seconds_per_step": (seconds - evaluation.seconds) / args.max_steps,
    }


def scenario_inputs(args):
    """(reward setup, reward pools or None for the synthetic draw, training prompts, held-out prompts) of `--scenario`."""
    if args.scenario == "dsp":
        setup = DSPRewardSetup.from_args(args, args.domains)
        pools = draw_dsp_pools(setup, args.data_dir)
        train_prompts, eval_prompts = dsp_prompts(pools, args.eval_prompts)
    else:
        setup = RewardSetup.from_args(args)
        pools = None
        train_prompts, eval_prompts = prompt_splits(args.num_contexts, args.eval_prompts)
    return setup, pools, train_prompts, eval_prompts


def probe_lengths(args, policy_path, tokenizer, eval_prompts, output_dir: Path, command: str) -> None:
    """
    How long the initial policy answers when let run: `--eval_samples` samples per held-out prompt at a budget of
    `--probe_lengths` tokens, with the run's sampling settings. Sizes `--max_completion_length`; writes
    initial_lengths[_dsp].md and .json.
    """
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    prompts = [prompt for prompt in eval_prompts["prompt"] for _ in range(args.eval_samples)]
    contexts = [context for context in eval_prompts["context_id"] for _ in range(args.eval_samples)]
    torch.manual_seed(0)
    started = time.perf_counter()
    _, tokens, capped = sample_completions(
        policy,
        tokenizer,
        prompts,
        args.probe_lengths,
        64,
        return_lengths=True,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
    )
    seconds = time.perf_counter() - started
    rows, summary = [], {}
    for context in sorted(set(contexts)):
        own = torch.tensor([n for n, c in zip(tokens, contexts) if c == context], dtype=torch.float32)
        cut = torch.tensor([k for k, c in zip(capped, contexts) if c == context], dtype=torch.float32)
        summary[context] = {
            "mean_tokens": own.mean().item(),
            "median_tokens": own.median().item(),
            "cap_share": cut.mean().item(),
            "samples": len(own),
        }
        rows.append([context, f"{own.mean():.0f}", f"{own.median():.0f}", f"{cut.mean():.2f}", len(own)])
    lines = [
        f"Command: `{command.strip()}`",
        "",
        f"The initial policy's answers to the held-out prompts of the {args.scenario} scenario, sampled at temperature "
        f"{args.temperature} with a budget of {args.probe_lengths} tokens ({seconds:.0f} s). A budget that leaves a taste "
        "for longer answers room to move is at least twice the mean; the cap share says how many answers the budget "
        "already cuts.",
        "",
        *markdown_table(
            ["context", "mean tokens", "median tokens", f"share cut at {args.probe_lengths}", "samples"], rows
        ),
    ]
    name = "initial_lengths" + ("_dsp" if args.scenario == "dsp" else "")
    results = {
        "title": f"How long the initial policy answers ({args.scenario} scenario)",
        "command": command.strip(),
        "budget": args.probe_lengths,
        "seconds": seconds,
        "contexts": summary,
    }
    _, markdown_path = write_report(results, output_dir / name, lines)
    print(markdown_path.read_text())


def run_settings(args) -> dict:
    return {name: getattr(args, name) for name in RUN_SETTINGS}


def load_finished_run(path: Path, settings: dict) -> dict | None:
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    return run if run.get("settings") == settings else None


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = command_line("benchmarks.rl.rl_personalization", argv or sys.argv[1:])
    output_dir = Path(args.output_dir)
    (output_dir / "runs").mkdir(parents=True, exist_ok=True)
    scratch = args.cache_dir or tempfile.mkdtemp(prefix="rl-personalization-")
    settings = run_settings(args)

    started = time.perf_counter()
    policy_path, policy_tokenizer, backbone, reward_tokenizer = load_models(args, scratch)
    setup, pools, train_prompts, eval_prompts = scenario_inputs(args)
    if args.probe_lengths:
        return probe_lengths(args, policy_path, policy_tokenizer, eval_prompts, output_dir, command)
    rewards = build_rewards(backbone, reward_tokenizer, setup, os.path.join(scratch, "features"), pools)
    reward_seconds = time.perf_counter() - started
    print(
        f"Rewards built in {reward_seconds:.0f} s; test accuracy: "
        + json.dumps({name: value["accuracy"] for name, value in rewards.accuracy.items()}),
        flush=True,
    )

    evaluation = GoldEvaluation(
        eval_prompts,
        rewards.gold,
        every=args.eval_every,
        samples_per_prompt=args.eval_samples,
        reference_samples=args.reference_samples,
        max_new_tokens=args.max_completion_length,
        generation_kwargs=dict(temperature=args.temperature, top_p=1.0, top_k=0),
        context_template=CONTEXT_TEMPLATE,
    )
    reward_of = {"micro": rewards.micro, "single": rewards.single, "gold": rewards.gold}
    runs, missing = [], []
    for seed in args.seeds:
        for method in args.methods:
            path = output_dir / "runs" / f"{args.scenario}-{method}-seed{seed}.json"
            run = load_finished_run(path, settings) if args.resume or args.report_only else None
            if run is None and args.report_only:
                missing.append({"method": method, "seed": seed})
                continue
            if run is None:
                run = train_policy(
                    method, reward_of[method], seed, args, policy_path, train_prompts, evaluation, scratch
                )
                run["settings"] = settings
                path.write_text(json.dumps(to_jsonable(run), indent=1) + "\n")
            print(f"{method} seed {seed}: {json.dumps(to_jsonable(run['points'][-1]))}", flush=True)
            runs.append(run)

    scenario = "DSP readers " + ", ".join(args.domains) if args.scenario == "dsp" else "synthetic subpopulations"
    if not runs:
        raise SystemExit(f"--report_only: no finished run of {args.methods} x seeds {args.seeds} in {output_dir}/runs.")
    results = {
        "title": f"RL personalization ({scenario}): GRPO against MiCRo, SingleReward and the gold reward",
        "scenario": args.scenario,
        "command": command.strip(),
        "settings": {**settings, "methods": args.methods, "seeds": args.seeds, "threads": args.threads},
        "policy": "tiny random Llama" if args.models == "tiny" else "SmolLM2-135M-Instruct (embedded), LoRA",
        "reward_backbone": "tiny random Llama" if args.models == "tiny" else "SmolLM2-135M-Instruct (embedded), frozen",
        "reward_sizes": rewards.sizes,
        "reward_accuracy": rewards.accuracy,
        "reward_seconds": reward_seconds,
        "eval_prompts_per_context": len(eval_prompts) // args.num_contexts,
        "train_prompts": len(train_prompts),
        "runs": runs,
        "missing_runs": missing,
    }
    markdown_path = write_outputs(
        results, output_dir, "rl_personalization" + ("_dsp" if args.scenario == "dsp" else "")
    )
    print(markdown_path.read_text())


if __name__ == "__main__":
    main()
