"""
Stage 2 benchmark: how many context-labelled pairs does router adaptation need to beat Stage 1 routing?

For each dataset: train a Stage 1 MiCRo model (frozen backbone, K heads, router) on the train split without contexts;
then, for n in --counts, start again from the Stage 1 router, adapt it on n pairs per context of the adaptation split
(contexts joined to the prompts), and measure per-context pairwise accuracy on the test split, whose prompts carry
their context too. Rows of the report:

    Stage 1 routing          the Stage 1 router on the test prompts (it never saw a context during training)
    adapted, n pairs         after router adaptation on n pairs per context
    ..., unseen wording      the same model on the test pairs with each context reworded in words the adaptation
                             never saw (a paraphrase of a synthetic persona; another phrasing of an HH criterion)
    best head per context    the single head that is most accurate on each context's test pairs (a ceiling for
                             routing that picks one head per context; chosen on the test set, so not a method)

Datasets:
- synthetic: `trl_micro.synthetic`, two subpopulations that disagree on length and formality, two heads, a tiny random
  frozen backbone (synthetic-4: four subpopulations over all six style axes, four heads). In the Stage 1 split the rater of a pair follows the prompt's topic (as
  harmless raters get red-teaming prompts in HH); that lets the unlabelled mixture split into one head per
  subpopulation. The adaptation and test splits mix every topic, so only the context says who rates.
  synthetic-smollm2: the synthetic data again, on the embedded SmolLM2-135M-Instruct (frozen): a backbone that knows
  what words mean, which is what routing an unseen wording of a context takes.
- hh_relabeled: HH-RLHF test pairs relabelled for helpfulness or harmlessness (context: "Prefer the most helpful /
  harmless response."), the embedded SmolLM2-135M-Instruct as frozen backbone, pairs of at most --hh_max_tokens
  tokens (context included) to keep the backbone pass short.

Router adaptation uses RouterAdaptationConfig's defaults on the tiny backbone and `EMBEDDED_ADAPTATION` on SmolLM2.

    python -m benchmarks.studies.stage2_adaptation                         # every dataset (~15 min on 2 CPU cores)
    python -m benchmarks.studies.stage2_adaptation --datasets synthetic    # under a minute

Writes benchmarks/studies/results/stage2_adaptation.md and .json (with the command, settings and timings).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, set_seed

from benchmarks import command_line, default_data_dir
from benchmarks.harness.metrics import adaptation_curve, best_head_accuracy, write_seeded_report
from trl_micro import MiCRoRewardConfig, MiCRoRewardModel, MiCRoRewardTrainer
from trl_micro.bundled.hh import load_hh_relabeled
from trl_micro.bundled.synthetic import (
    AXES,
    SyntheticPreferenceConfig,
    generate_synthetic_preferences,
    rated_by_topic_owner,
    subpopulation_paraphrases,
)
from trl_micro.evaluation import head_usage, per_context_accuracy
from trl_micro.scoring import score_preference_pairs
from trl_micro.splits import split_by_context, take_per_context
from trl_micro.testing_utils import build_tiny_micro_model, build_tiny_tokenizer
from trl_micro.trainer import RouterAdaptationConfig, RouterAdaptationTrainer

REPO_ROOT = Path(__file__).resolve().parents[2]

RESULTS = Path(__file__).resolve().parent / "results" / "stage2_adaptation"


def shown_path(path: str) -> str:
    """`path` as a report shows it: relative to the checkout when inside it, so the report names no local folder."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO_ROOT).as_posix() if resolved.is_relative_to(REPO_ROOT) else str(path)


HH_REWORDINGS = {  # criteria in words the adaptation never saw
    "helpful": "Pick the reply that is most useful to the person asking.",
    "harmless": "Pick the reply that is least likely to hurt anyone or help them do damage.",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--counts", nargs="+", type=int, default=[8, 32, 128], help="Adaptation pairs per context.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning_rate", type=float, default=None, help="Router adaptation lr (config default).")
    parser.add_argument("--router_anchor_coef", type=float, default=None, help="Pull toward Stage 1 (config default).")
    parser.add_argument(
        "--num_train_epochs", type=float, default=None, help="Router adaptation epochs (config default)."
    )
    parser.add_argument("--max_steps", type=int, default=None, help="Router adaptation steps, overriding epochs.")
    parser.add_argument("--hh_train_pairs", type=int, default=200, help="Stage 1 pairs per context (HH).")
    parser.add_argument("--hh_test_pairs", type=int, default=120, help="Test pairs per context (HH).")
    parser.add_argument("--hh_max_tokens", type=int, default=160, help="Longest HH sequence kept, in tokens.")
    parser.add_argument(
        "--data_dir",
        default=default_data_dir(),
        help="Real data folder (default: $TRL_MICRO_DATA_DIR, else ../shared/data).",
    )
    parser.add_argument("--cache_dir", default=None, help="Feature cache (default: a temporary folder).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--output", default=str(RESULTS), help="Report path prefix (.md and .json are added).")
    return parser.parse_args(argv)


# Router adaptation on SmolLM2 features: a lower learning rate than the config's default, and a fixed number of steps,
# so that 8 pairs per context get as many updates as 128 (see RouterAdaptationConfig's docstring). Picked on
# synthetic-smollm2 among lr 5e-4 to 1e-2, 30 epochs or 300 steps, when the router read raw hidden states; with the
# standardized router input, 1e-2 and 3e-2 were no better on the synthetic M=4 benchmark. benchmarks/harness/plan.py uses it.
EMBEDDED_ADAPTATION = dict(learning_rate=2e-3, max_steps=300)


# ------------------------------------------------------------------------------------------------------ datasets
def synthetic_setup(args, num_subpopulations: int, axes: tuple[str, ...], backbone: str = "tiny"):
    """
    The synthetic splits described in the module docstring, on a frozen backbone: a tiny random one ("tiny") or the
    embedded SmolLM2-135M-Instruct ("embedded"), whose features carry the meaning of a context's words.
    """
    num_stage1, num_adaptation, num_test = 300 * num_subpopulations, max(args.counts), 200
    config = SyntheticPreferenceConfig(
        num_subpopulations=num_subpopulations,
        axes=axes,
        seed=args.seed,
        num_pairs_per_subpopulation=num_stage1 + num_adaptation + num_test,
    )
    data = generate_synthetic_preferences(config)
    if backbone == "embedded":
        from trl_micro.bundled.embedded import embedded_model_path

        tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
        model = MiCRoRewardModel.from_backbone(embedded_model_path(), num_heads=num_subpopulations)
        stage1_args = dict(
            per_device_train_batch_size=32, num_train_epochs=30, learning_rate=5e-3, adaptation=EMBEDDED_ADAPTATION
        )
    else:
        texts = [row[column] for row in data.select(range(200)) for column in ("prompt", "chosen", "rejected")]
        tokenizer = build_tiny_tokenizer(texts + sorted(set(data["context"])), vocab_size=1000)
        model = build_tiny_micro_model(tokenizer, num_heads=num_subpopulations, seed=args.seed)
        stage1_args = dict(per_device_train_batch_size=32, num_train_epochs=30, learning_rate=2e-2)
    parts = split_by_context(data, sizes_per_context=(num_stage1, num_adaptation, num_test), seed=args.seed)

    rewordings = {f"subpop-{m}": subpopulation_paraphrases(m)[0] for m in range(config.num_subpopulations)}
    stage1_train = rated_by_topic_owner(parts["train"], num_subpopulations)
    return model, tokenizer, stage1_train, parts["adaptation"], parts["test"], stage1_args, rewordings


def hh_setup(args):
    """Embedded SmolLM2 backbone and HH-relabeled pairs short enough for a CPU run."""
    from trl_micro.bundled.embedded import embedded_model_path
    from trl_micro.bundled.hh import ASSISTANT_MARKER

    path = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_hh_relabeled(args.data_dir)

    def short(row):
        prompt = row["context"] + "\n\n" + row["prompt"]
        return all(
            len(tokenizer(prompt + row[side])["input_ids"]) < args.hh_max_tokens for side in ("chosen", "rejected")
        )

    data = data.filter(short)
    sizes = (args.hh_train_pairs, max(args.counts), args.hh_test_pairs)
    parts = split_by_context(data, sizes_per_context=sizes, seed=args.seed)
    model = MiCRoRewardModel.from_backbone(path, num_heads=2)
    stage1_args = dict(
        per_device_train_batch_size=32,
        num_train_epochs=30,
        learning_rate=5e-3,
        prompt_marker=ASSISTANT_MARKER,
        adaptation=EMBEDDED_ADAPTATION,
    )
    return model, tokenizer, parts["train"], parts["adaptation"], parts["test"], stage1_args, HH_REWORDINGS


# ------------------------------------------------------------------------------------------------------ protocol
def run_dataset(name, model, tokenizer, stage1_train, adaptation, test, stage1_args, rewordings, args, cache_dir):
    """Stage 1, then one adaptation per count; accuracy on `test` and on `test` with its contexts reworded."""
    stage1_args = dict(stage1_args)
    adaptation_args = stage1_args.pop("adaptation", {})
    common = dict(
        report_to="none",
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
        logging_steps=10_000,
        feature_cache_dir=cache_dir,
        prompt_marker=stage1_args.pop("prompt_marker", None),
    )
    timings = {}
    start = time.perf_counter()
    stage1_config = MiCRoRewardConfig(
        output_dir=os.path.join(cache_dir, f"{name}-stage1"),
        num_heads=model.num_heads,
        freeze_backbone=True,
        **stage1_args,
        **common,
    )
    MiCRoRewardTrainer(
        model=model,
        args=stage1_config,
        train_dataset=stage1_train.remove_columns("context"),
        processing_class=tokenizer,
    ).train()
    timings["stage1_s"] = time.perf_counter() - start

    reworded = test.map(lambda row: {"context": rewordings[row["context_id"]]})
    contexts = test["context_id"]

    def evaluate(method):
        scores = {}
        for label, data in (("", test), (", unseen wording", reworded)):
            scores[label] = score_preference_pairs(
                model, data, tokenizer, feature_cache_dir=cache_dir, prompt_marker=common["prompt_marker"]
            )
            methods[f"{name}: {method}{label}"] = per_context_accuracy(scores[label].margins, contexts)
        usage[f"{name}: {method}"] = head_usage(scores[""].mixture_weights, contexts)
        same_head = scores[""].mixture_weights.argmax(-1) == scores[", unseen wording"].mixture_weights.argmax(-1)
        agreement[method] = same_head.float().mean().item()
        return scores[""]

    methods, usage, agreement, curve = {}, {}, {}, {}
    start = time.perf_counter()
    stage1_scores = evaluate("Stage 1 routing")
    timings["test_features_s"] = time.perf_counter() - start
    stage1_router = {key: value.clone() for key, value in model.router.state_dict().items()}
    tuned = ("learning_rate", "router_anchor_coef", "num_train_epochs", "max_steps")
    overrides = {**adaptation_args, **{key: getattr(args, key) for key in tuned if getattr(args, key) is not None}}
    for count in sorted(args.counts):
        model.router.load_state_dict(stage1_router)
        start = time.perf_counter()
        config = RouterAdaptationConfig(
            output_dir=os.path.join(cache_dir, f"{name}-adapt-{count}"), **overrides, **common
        )
        RouterAdaptationTrainer(
            model=model,
            args=config,
            processing_class=tokenizer,
            train_dataset=take_per_context(adaptation, count, seed=args.seed),
        ).train()
        timings[f"adapt_{count}_s"] = time.perf_counter() - start
        evaluate(f"adapted, {count} pairs")
        curve[count] = methods[f"{name}: adapted, {count} pairs"]
    methods[f"{name}: best head per context"] = best_head_accuracy(stage1_scores.head_margins, contexts)
    model.router.load_state_dict(stage1_router)
    run = {
        "timings": timings,
        "sizes": {"stage1_train": len(stage1_train), "adaptation_pool": len(adaptation), "test": len(test)},
        "rewordings": rewordings,
        "adaptation_settings": overrides or "RouterAdaptationConfig defaults",
        "same_top_head_with_unseen_wording": agreement,
    }
    return methods, adaptation_curve(curve, method=f"{name}: adapted"), usage, run


DATASETS = {
    "synthetic": lambda args: synthetic_setup(args, 2, ("length", "formality")),
    "synthetic-4": lambda args: synthetic_setup(args, 4, AXES),
    "synthetic-smollm2": lambda args: synthetic_setup(args, 2, ("length", "formality"), backbone="embedded"),
    "hh_relabeled": hh_setup,
}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = command_line("benchmarks.studies.stage2_adaptation", argv or sys.argv[1:])
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="stage2-benchmark-")
    results = {
        "title": "Stage 2: router adaptation vs Stage 1 routing",
        "command": command,
        "methods": {},
        "adaptation_curves": [],
        "head_usage": {},
        "runs": {},
        "settings": {**vars(args), "output": shown_path(args.output)},
    }
    for name in args.datasets:
        set_seed(args.seed)  # the heads and router of a model built from a backbone start from torch's generator
        setup = DATASETS[name](args)
        start = time.perf_counter()
        methods, curve, usage, run = run_dataset(name, *setup, args=args, cache_dir=cache_dir)
        run["timings"]["total_s"] = time.perf_counter() - start
        results["methods"].update(methods)
        results["adaptation_curves"] += curve
        results["head_usage"].update(usage)
        results["runs"][name] = run
        print(f"{name}: {run['timings']}", flush=True)
    json_path, markdown_path = write_seeded_report(results, args.output)
    lines = markdown_path.read_text().splitlines()
    notes = [f"Command: `{results['command']}`", "", *setup_notes(results)]
    markdown_path.write_text("\n".join([lines[0], "", *notes, *lines[1:]]) + "\n")
    print(markdown_path.read_text())


def setup_notes(results) -> list[str]:
    lines = [
        "Protocol and datasets: see the docstring of benchmarks/studies/stage2_adaptation.py. Backbone features are cached under",
        "--cache_dir; a run that finds them there does not pay for the backbone pass in its timings.",
        "",
    ]
    for name, run in results["runs"].items():
        timings = ", ".join(f"{key} {value:.0f}" for key, value in run["timings"].items())
        sizes = ", ".join(f"{key} {value}" for key, value in run["sizes"].items())
        agreement = ", ".join(f"{key} {value:.2f}" for key, value in run["same_top_head_with_unseen_wording"].items())
        lines.append(f"- {name}: pairs {sizes}; seconds: {timings}.")
        lines.append(f"  Router adaptation: {run['adaptation_settings']}.")
        lines.append(f"  Unseen wordings: {run['rewordings']}.")
        lines.append(f"  Fraction of test pairs whose top head is the same with the unseen wording: {agreement}.")
    return [*lines, ""]


if __name__ == "__main__":
    main()
