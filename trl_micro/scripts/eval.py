r"""
`trl-micro eval`: score a saved MiCRo checkpoint on a preference dataset with a context column, and write a report.

    trl-micro eval --model_name_or_path outputs/micro-rm --dataset_name trl-micro/hh_relabeled \
        --output_dir outputs/eval [--adaptation_pairs 32]

Every pair is scored as the model scores it in use: its context text joined to the prompt (`context_column`, through
the model's `context_template`), one backbone pass per sequence. Pairs are grouped by `context_id_column` (the context
text itself when that column is absent). Reported, per context: the routed reward's accuracy (the checkpoint's
router), the accuracy of the uniform mixture of heads and of every single head, and the router's mean weight per head.

With `--adaptation_pairs N`, N pairs of every context are taken out (seeded) to adapt an online router per context
(`trl_micro.online_router.OnlineRouter`: prior = the checkpoint router's mean weights over those pairs, updated with their
head margins) and, on top of it, a residual head per context (`trl_micro.residual_heads.ResidualHeads`, lambda
cross-validated on the same pairs; from 2 pairs per context); every method is reported on the remaining pairs only.

Writes `<output_dir>/eval_report.json` and `.md` (`trl_micro.evaluation.write_report`; the online router's weights are
in the report too), and the plots `accuracy_per_context.png` and `head_usage.png` (the checkpoint router's mean weight
per head and context). With adaptation it also saves what was adapted, keyed by context id, ready for the reward in
RL (`MiCRoReward.from_pretrained(checkpoint, user_column=<context id column>, online_router=<output_dir>/
online_router.json, residual_heads=<output_dir>/residual_heads.json)`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoTokenizer, HfArgumentParser

from ..bundled.catalog import load_named_dataset
from ..context_adaptation import ONLINE_ROUTER_STORE, RESIDUAL_HEADS_STORE, adapt_to_contexts
from ..data_utils import take_per_context
from ..evaluation import (
    ensure_writable,
    head_accuracy,
    head_usage,
    per_context_accuracy,
    plot_accuracy_per_context,
    plot_head_usage_heatmap,
    write_report,
)
from ..modeling_micro import MiCRoRewardModel
from ..scoring import score_preference_pairs
from ..user_stores import normalize_user_id

REPORT_NAME = "eval_report"
ACCURACY_PLOT = "accuracy_per_context.png"
USAGE_PLOT = "head_usage.png"
ROUTED, UNIFORM = "routed (checkpoint router)", "uniform mixture of heads"


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "A saved MiCRo checkpoint (directory with config and weights)."})
    dataset_name: str = field(
        metadata={"help": "Local preference file/directory, or trl-micro/hh_relabeled, trl-micro/hh_rlhf, trl-micro/synthetic."}
    )
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where the report and plots are written."})
    dataset_split: str | None = field(
        default=None, metadata={"help": "Split to score (default: 'test' if present, else the only split)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Config of a built-in dataset (synthetic: M)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the real data (default ../shared/data)."})
    context_column: str = field(default="context", metadata={"help": "Column of the context text joined to the prompt."})
    context_id_column: str | None = field(
        default="context_id", metadata={"help": "Column grouping the report by context (default: the context text)."}
    )
    prompt_marker: str | None = field(default=None, metadata={"help": "Marker ending implicit prompts, as in training."})
    max_pairs: int | None = field(default=None, metadata={"help": "Score at most this many pairs (the first ones)."})
    adaptation_pairs: int = field(
        default=0, metadata={"help": "Pairs per context used to adapt an online router (0: no adaptation)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per backbone batch."})
    feature_cache_dir: str | None = field(default=None, metadata={"help": "Cache backbone features in this folder."})
    seed: int = field(default=0, metadata={"help": "Seed of the built-in splits and of the adaptation draw."})


def report_paths(output_dir: str | Path, adaptation_pairs: int = 0) -> dict[str, Path]:
    """The files `run_eval` writes (the adaptation stores only when it adapts, the residual heads from 2 pairs)."""
    folder = Path(output_dir)
    paths = {
        "json": folder / f"{REPORT_NAME}.json",
        "markdown": folder / f"{REPORT_NAME}.md",
        "accuracy_plot": folder / ACCURACY_PLOT,
        "usage_plot": folder / USAGE_PLOT,
    }
    if adaptation_pairs > 0:
        paths["online_router"] = folder / ONLINE_ROUTER_STORE
    if adaptation_pairs > 1:
        paths["residual_heads"] = folder / RESIDUAL_HEADS_STORE
    return paths


def load_split(args: EvalArguments):
    splits = load_named_dataset(args.dataset_name, args.dataset_config, args.data_dir, seed=args.seed)
    name = args.dataset_split or ("test" if "test" in splits else None)
    if name is None:
        if len(splits) != 1:
            raise ValueError(f"{args.dataset_name} has the splits {list(splits)}; choose one with --dataset_split.")
        name = next(iter(splits))
    if name not in splits:
        raise ValueError(f"{args.dataset_name} has no split {name!r}; it has {list(splits)}.")
    dataset = splits[name]
    if args.max_pairs is not None:
        dataset = dataset.select(range(min(args.max_pairs, len(dataset))))
    return dataset


def context_labels(dataset, args: EvalArguments) -> tuple[list[str], str]:
    """Each pair's context label, and the column it comes from. Raises when the dataset has no context column."""
    if args.context_column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no context column {args.context_column!r} (columns: {sorted(dataset.column_names)}). A "
            "context-level report needs each pair's context text: name its column with --context_column."
        )
    column = args.context_id_column if args.context_id_column in dataset.column_names else args.context_column
    return [normalize_user_id(value, f"{column}[{row}]") for row, value in enumerate(dataset[column])], column


def split_adaptation(dataset, labels: list[str], label_column: str, args: EvalArguments) -> tuple[list[int], list[int]]:
    """Indices of the adaptation pairs (`adaptation_pairs` per context) and of the evaluated pairs (all the others)."""
    if args.adaptation_pairs <= 0:
        return [], list(range(len(dataset)))
    counts = {label: labels.count(label) for label in sorted(set(labels))}
    short = {label: count for label, count in counts.items() if count <= args.adaptation_pairs}
    if short:
        raise ValueError(
            f"--adaptation_pairs {args.adaptation_pairs} needs more than that many pairs in every context (the rest "
            f"are evaluated), but these contexts have fewer: {short}. Lower --adaptation_pairs or add pairs."
        )
    indexed = Dataset.from_dict({"row": list(range(len(dataset))), label_column: labels})
    adaptation = list(take_per_context(indexed, args.adaptation_pairs, label_column, seed=args.seed)["row"])
    chosen = set(adaptation)
    return adaptation, [row for row in range(len(dataset)) if row not in chosen]


def run_eval(args: EvalArguments) -> dict:
    """Score, then write the report and the plots; returns the results and the written paths."""
    if args.adaptation_pairs < 0:
        raise ValueError(f"--adaptation_pairs must be >= 0, got {args.adaptation_pairs}.")
    paths = report_paths(args.output_dir, args.adaptation_pairs)
    for path in paths.values():
        ensure_writable(path)
    dataset = load_split(args)
    labels, label_column = context_labels(dataset, args)
    adaptation, evaluated = split_adaptation(dataset, labels, label_column, args)

    model = MiCRoRewardModel.from_pretrained(args.model_name_or_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    scores = score_preference_pairs(
        model,
        dataset,
        tokenizer,
        context_column=args.context_column,
        prompt_marker=args.prompt_marker or model.config.prompt_marker,
        batch_size=args.batch_size,
        feature_cache_dir=args.feature_cache_dir,
    )
    evaluated_labels = [labels[row] for row in evaluated]
    head_margins = scores.head_margins[evaluated]
    methods = {
        ROUTED: per_context_accuracy(scores.margins[evaluated], evaluated_labels),
        UNIFORM: per_context_accuracy(head_margins.mean(dim=-1), evaluated_labels),
    }
    usage = {ROUTED: head_usage(scores.mixture_weights[evaluated], evaluated_labels)}
    if adaptation:
        adaptation_labels = [labels[row] for row in adaptation]
        adapted = adapt_to_contexts(
            adaptation_labels, scores.subset(adaptation), residual_heads=args.adaptation_pairs >= 2
        )
        evaluated_scores = scores.subset(evaluated)
        online = f"online routing ({args.adaptation_pairs} pairs per context)"
        methods[online] = per_context_accuracy(
            adapted.margins(evaluated_scores, evaluated_labels, with_residuals=False), evaluated_labels
        )
        online_weights = torch.stack([adapted.online_router.weights(label) for label in evaluated_labels])
        usage[online] = head_usage(online_weights, evaluated_labels)
        if adapted.residual_heads is not None:
            methods[f"online routing + residual heads ({args.adaptation_pairs} pairs per context)"] = (
                per_context_accuracy(adapted.margins(evaluated_scores, evaluated_labels), evaluated_labels)
            )
        adapted.save(args.output_dir)
    for k in range(head_margins.shape[1]):
        methods[f"head {k} alone"] = per_context_accuracy(head_margins[:, k], evaluated_labels)

    results = {
        "title": f"MiCRo evaluation of {args.model_name_or_path} on {args.dataset_name}",
        "methods": methods,
        "head_usage": usage,
        "head_accuracy": head_accuracy(head_margins, evaluated_labels),
        "num_pairs": {"scored": len(dataset), "evaluated": len(evaluated), "adaptation": len(adaptation)},
        "context_column": args.context_column,
        "context_label_column": label_column,
        "arguments": vars(args),
    }
    write_report(results, paths["json"].with_suffix(""))
    plot_accuracy_per_context(
        {name: methods[name] for name in methods if not name.startswith("head ")},
        paths["accuracy_plot"],
        title="Pairwise accuracy per context",
    )
    plot_head_usage_heatmap(
        usage[ROUTED]["usage"], usage[ROUTED]["contexts"], paths["usage_plot"],
        title="Mean router weight per head and context (checkpoint router)",
    )
    return {"results": results, "paths": paths}


def format_summary(outcome: dict) -> str:
    results, paths = outcome["results"], outcome["paths"]
    lines = []
    for name, accuracy in results["methods"].items():
        if name.startswith("head "):
            continue
        per_context = ", ".join(f"{context} {100 * value:.1f}%" for context, value in accuracy["accuracy"].items())
        lines.append(f"{name}: macro {100 * accuracy['macro']:.1f}% ({per_context})")
    best = np.argmax(results["head_accuracy"]["overall"])
    lines.append(f"best single head: {best} ({100 * results['head_accuracy']['overall'][best]:.1f}% overall)")
    lines.append("report: " + ", ".join(str(path) for path in paths.values()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    print(format_summary(run_eval(args)))
    return 0
