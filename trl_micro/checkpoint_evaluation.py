r"""
Evaluation of a saved MiCRo checkpoint on a preference dataset whose pairs name their context or user, and its report:
what `trl-micro eval` runs (`run_eval(EvalArguments(...))`, the command's flags are the fields).

Every pair is scored as the model scores it in use, one backbone pass per sequence: with a context text column
(`context_column`), that text joined to the prompt through the model's `context_template`; without one, the prompt as
it is. Pairs are grouped by `context_id_column` (user or context ids; the context text when that column is absent):
a column of ids and no context text is enough, for the report and for the per-id adaptation below. Reported, per
context: the routed reward's accuracy (the checkpoint's router), the accuracy of the uniform mixture of heads and of
every single head, and the router's mean weight per head. Over all evaluated pairs, the heads' agreement
(`trl_micro.losses.head_agreement`, the share of pairs two heads rank alike): at `HEAD_AGREEMENT_WARNING` or above the
summary warns that the heads have not separated, so there is little for routing to choose from.

With `--adaptation_pairs N`, N pairs of every context are taken out (seeded) to adapt an online router per context
(`trl_micro.personalization.online_router.OnlineRouter`: prior = the checkpoint router's mean weights over those pairs, updated with
their head margins) and, on top of it, a residual head per context (`trl_micro.personalization.residual_heads.ResidualHeads`, lambda
cross-validated on the same pairs; from 2 pairs per context); every method is reported on the remaining pairs only.
With `--adaptation_pool M` (M > N) M pairs per context are set aside and N of them chosen, one at a time as a user
would answer them, by `--query_strategy` (`information`: the pair whose label tells most about which head the context
follows; `disagreement`; `random`; `trl_micro.personalization.query_selection`); the other pairs of the pool are neither used nor
evaluated. `--routing` says how each context's weights over the heads are fitted
(`trl_micro.personalization.mixture_weights`): `posterior` (default), the online router's posterior of "which one head";
`mixture`, the context's MAP mixture weights over the heads, for users whose comparisons come from several heads; `auto`,
the better of the two on each context's own pairs (leave-one-out). `--user_store URL` also writes what was adapted into
a user store (`sqlite:///users.db`, `postgresql://...`; `trl_micro.personalization.stores`), where the server and the RL
reward read it by user id.

Every row is checked before anything is scored: a malformed one (a missing or non-text prompt or response, a prompt
and responses in different formats, an empty prompt, a missing context id) stops the run with an error naming the
row and the field; `--skip_malformed_rows` scores the other rows and reports how many were skipped.

Writes `<output_dir>/eval_report.json` and `.md` (`trl_micro.evaluation_reports.write_report`; the online router's weights are
in the report too), and the plots `accuracy_per_context.png` and `head_usage.png` (the checkpoint router's mean weight
per head and context). With adaptation it also saves what was adapted, keyed by context id, ready for the reward in
RL (`MiCRoReward.from_pretrained(checkpoint, user_column=<context id column>, online_router=<output_dir>/
online_router.json, residual_heads=<output_dir>/residual_heads.json)`). A local checkpoint's model card gets the
per-context table (`trl_micro.model_card.add_evaluation_section`; `--update_model_card false` leaves it alone).
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from .bundled.catalog import load_named_dataset, resolve_model_path
from .evaluation import head_accuracy, head_usage, per_context_accuracy
from .evaluation_reports import (
    accuracy_lines,
    ensure_writable,
    plot_accuracy_per_context,
    plot_head_usage_heatmap,
    write_report,
)
from .feature_cache import reward_model_fingerprint
from .losses import HEAD_AGREEMENT_WARNING, head_agreement
from .model_card import add_evaluation_section, data_name, message_text
from .modeling_micro import MiCRoRewardModel
from .personalization.adaptation import ONLINE_ROUTER_STORE, RESIDUAL_HEADS_STORE, adapt_to_users
from .personalization.mixture_weights import ROUTING_RULES
from .personalization.stores import open_user_store
from .scoring import score_preference_pairs
from .splits import take_per_context
from .value_checks import normalize_user_id

REPORT_NAME = "eval_report"
ACCURACY_PLOT = "accuracy_per_context.png"
USAGE_PLOT = "head_usage.png"
ROUTED, UNIFORM = "routed (checkpoint router)", "uniform mixture of heads"


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "A MiCRo checkpoint: a local directory or a Hub model id."})
    dataset_name: str = field(
        metadata={
            "help": "Local preference file/directory, a Hub dataset id, or trl-micro/hh_relabeled, "
            "trl-micro/hh_rlhf, trl-micro/synthetic."
        }
    )
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where the report and plots are written."})
    dataset_split: str | None = field(
        default=None, metadata={"help": "Split to score (default: 'test' if present, else the only split)."}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset config (load_dataset's `name`; synthetic: the number M)."}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder of the built-ins' real data (default: $TRL_MICRO_DATA_DIR)."}
    )
    context_column: str | None = field(
        default="context", metadata={"help": "Column of context text joined to the prompt (optional)."}
    )
    context_id_column: str | None = field(
        default="context_id",
        metadata={
            "help": "Column of user or context ids grouping the report and keying the adaptation (default: the "
            "context text); ids alone, without context text, are enough."
        },
    )
    skip_malformed_rows: bool = field(
        default=False, metadata={"help": "Skip malformed rows (and report how many) instead of stopping at the first."}
    )
    update_model_card: bool = field(
        default=True, metadata={"help": "Add the per-context table to a local checkpoint's model card (README.md)."}
    )
    prompt_marker: str | None = field(
        default=None, metadata={"help": "Marker ending implicit prompts, as in training."}
    )
    max_pairs: int | None = field(default=None, metadata={"help": "Score at most this many pairs (the first ones)."})
    adaptation_pairs: int = field(
        default=0, metadata={"help": "Pairs per context used to adapt an online router (0: no adaptation)."}
    )
    query_strategy: str = field(
        default="random",
        metadata={
            "help": "How the adaptation pairs are chosen from each context's pool: random, information (BALD) or "
            "disagreement (trl_micro.personalization.query_selection).",
            "choices": ["random", "information", "disagreement"],
        },
    )
    adaptation_pool: int | None = field(
        default=None,
        metadata={"help": "Pairs per context to choose the adaptation pairs from (default: --adaptation_pairs)."},
    )
    routing: str = field(
        default="posterior",
        metadata={
            "help": "How each context's weights over the heads are fitted from its adaptation pairs: posterior (one "
            "head), mixture (MAP mixture weights) or auto (the better on the context's own pairs).",
            "choices": ["posterior", "mixture", "auto"],
        },
    )
    prior_strength: float = field(
        default=2.0, metadata={"help": "--routing mixture / auto: the mixture weights' prior, in pseudo-comparisons."}
    )
    user_store: str | None = field(
        default=None,
        metadata={"help": "Also write the adapted users into this user store (sqlite:///users.db, postgresql://...)."},
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


def context_columns(dataset, args: EvalArguments) -> tuple[str | None, str]:
    """(the context text column, or None without one; the column labelling each pair's context or user)."""
    names = dataset.column_names
    text = args.context_column if args.context_column in names else None
    label = args.context_id_column if args.context_id_column in names else text
    if label is None:
        raise ValueError(
            f"The dataset names no pair's context or user: it has no context id column {args.context_id_column!r} "
            f"and no context column {args.context_column!r} (columns: {sorted(names)}). Name a column of user or "
            "context ids with --context_id_column (ids alone are enough) or of context text with --context_column."
        )
    return text, label


def _describe(value) -> str:
    return "None" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"


def is_message(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("role"), str) and isinstance(value.get("content"), str)


def malformed_field(example: dict, text_column: str | None, label_column: str) -> tuple[str, str] | None:
    """The first malformed field of a preference row and what is wrong with it, or `None` for a good row."""
    formats = {}
    for column in ("prompt", "chosen", "rejected"):
        if column not in example:
            continue
        value = example[column]
        if isinstance(value, str):
            formats[column] = "text"
        elif isinstance(value, list) and value and all(is_message(message) for message in value):
            formats[column] = "messages"
        else:
            return column, f"is {_describe(value)}, not text or a list of messages with `role` and `content`"
    first = next(iter(formats), None)
    for column, kind in formats.items():
        if kind != formats[first]:
            return column, f"is {kind} but `{first}` is {formats[first]}: use one format per row"
    if "prompt" in example and not message_text(example["prompt"]).strip():
        return "prompt", "is empty (the router reads the prompt)"
    if text_column is not None and not isinstance(example[text_column], (str, type(None))):
        return text_column, f"is {_describe(example[text_column])}, not text"
    label = example[label_column]
    if label is None or (isinstance(label, str) and not label.strip()):
        return label_column, "is missing: every pair needs its context or user id"
    try:
        normalize_user_id(label, label_column)
    except TypeError:
        return label_column, f"is {_describe(label)}: ids are text or integers"
    return None


def check_rows(
    dataset, text_column: str | None, label_column: str, skip_malformed: bool = False, source: str = "the dataset"
):
    """`dataset` without malformed rows, and how many there were; unless `skip_malformed`, the first one raises."""
    bad = [
        (row, found)
        for row, example in enumerate(dataset)
        if (found := malformed_field(example, text_column, label_column)) is not None
    ]
    if bad and not skip_malformed:
        row, (column, problem) = bad[0]
        raise ValueError(
            f"Row {row} of {source}: `{column}` {problem}. {len(bad)} of {len(dataset)} rows are malformed; "
            "fix them, or pass --skip_malformed_rows to score the others (the report counts the skipped rows)."
        )
    if bad:
        skipped = {row for row, _ in bad}
        dataset = dataset.select([row for row in range(len(dataset)) if row not in skipped])
    return dataset, len(bad)


def adaptation_pool_size(args: EvalArguments) -> int:
    """Pairs per context set aside to adapt from: `adaptation_pool`, else `adaptation_pairs`; checked."""
    pool = args.adaptation_pairs if args.adaptation_pool is None else args.adaptation_pool
    if pool < args.adaptation_pairs:
        raise ValueError(
            f"--adaptation_pool {pool} is below --adaptation_pairs {args.adaptation_pairs}: the pool "
            "is what the adaptation pairs are chosen from."
        )
    if args.query_strategy != "random" and pool == args.adaptation_pairs and args.adaptation_pairs > 0:
        raise ValueError(
            f"--query_strategy {args.query_strategy} chooses --adaptation_pairs among --adaptation_pool "
            "pairs per context; with a pool of the same size there is nothing to choose. Set "
            f"--adaptation_pool above {args.adaptation_pairs} (e.g. {4 * args.adaptation_pairs})."
        )
    return pool


def split_adaptation(dataset, labels: list[str], label_column: str, args: EvalArguments) -> tuple[list[int], list[int]]:
    """Indices of the adaptation pool (`adaptation_pool_size` per context) and of the evaluated pairs (the others)."""
    if args.adaptation_pairs <= 0:
        return [], list(range(len(dataset)))
    pool = adaptation_pool_size(args)
    counts = {label: labels.count(label) for label in sorted(set(labels))}
    short = {label: count for label, count in counts.items() if count <= pool}
    if short:
        flag = "--adaptation_pairs" if args.adaptation_pool is None else "--adaptation_pool"
        raise ValueError(
            f"{flag} {pool} needs more than that many pairs in every context (the rest are evaluated), but these "
            f"contexts have fewer: {short}. Lower {flag} or add pairs."
        )
    indexed = Dataset.from_dict({"row": list(range(len(dataset))), label_column: labels})
    adaptation = list(take_per_context(indexed, pool, label_column, seed=args.seed)["row"])
    chosen = set(adaptation)
    return adaptation, [row for row in range(len(dataset)) if row not in chosen]


def run_eval(args: EvalArguments) -> dict:
    """Score, then write the report and the plots; returns the results and the written paths."""
    if args.adaptation_pairs < 0:
        raise ValueError(f"--adaptation_pairs must be >= 0, got {args.adaptation_pairs}.")
    if args.routing not in ROUTING_RULES:
        raise ValueError(f"--routing must be one of {', '.join(ROUTING_RULES)}, got {args.routing!r}.")
    if args.user_store is not None and args.adaptation_pairs <= 0:
        raise ValueError("--user_store stores what --adaptation_pairs adapts: pass --adaptation_pairs N (N >= 1) too.")
    paths = report_paths(args.output_dir, args.adaptation_pairs)
    for path in paths.values():
        ensure_writable(path)
    card = model_card_path(args)
    dataset = load_split(args)
    text_column, label_column = context_columns(dataset, args)
    dataset, skipped = check_rows(dataset, text_column, label_column, args.skip_malformed_rows, args.dataset_name)
    if len(dataset) == 0:
        raise ValueError(f"Every row of {args.dataset_name} is malformed: nothing to evaluate.")
    labels = [normalize_user_id(value, f"{label_column}[{row}]") for row, value in enumerate(dataset[label_column])]
    adaptation, evaluated = split_adaptation(dataset, labels, label_column, args)

    model_path = resolve_model_path(args.model_name_or_path)
    model = MiCRoRewardModel.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    scores = score_preference_pairs(
        model,
        dataset,
        tokenizer,
        context_column=text_column,
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
    labelled, routing_rules, stored_users = 0, {}, 0
    if adaptation:
        adaptation_labels = [labels[row] for row in adaptation]
        fingerprint = None if args.user_store is None else reward_model_fingerprint(model)
        adapted = adapt_to_users(
            adaptation_labels,
            scores.subset(adaptation),
            residual_heads=args.adaptation_pairs >= 2,
            num_queries=args.adaptation_pairs if adaptation_pool_size(args) > args.adaptation_pairs else None,
            query_strategy=args.query_strategy,
            query_seed=args.seed,
            routing=args.routing,
            prior_strength=args.prior_strength,
            model_fingerprint=fingerprint,
        )
        labelled = len(adaptation) if adapted.labelled_rows is None else len(adapted.labelled_rows)
        evaluated_scores = scores.subset(evaluated)
        chosen = "" if args.query_strategy == "random" else f", chosen by {args.query_strategy}"
        chosen += "" if args.routing == "posterior" else f", {args.routing} weights"
        online = f"online routing ({args.adaptation_pairs} pairs per context{chosen})"
        methods[online] = per_context_accuracy(
            adapted.margins(evaluated_scores, evaluated_labels, with_residuals=False), evaluated_labels
        )
        online_weights = torch.stack([adapted.online_router.weights(label) for label in evaluated_labels])
        usage[online] = head_usage(online_weights, evaluated_labels)
        if adapted.residual_heads is not None:
            methods[f"online routing + residual heads ({args.adaptation_pairs} pairs per context{chosen})"] = (
                per_context_accuracy(adapted.margins(evaluated_scores, evaluated_labels), evaluated_labels)
            )
        adapted.save(args.output_dir)
        routing_rules = dict(sorted(adapted.routing_rules.items())) if adapted.routing_rules else {}
        if args.user_store is not None:
            with closing(open_user_store(args.user_store, model.config.num_heads, fingerprint)) as store:
                stored_users = adapted.save_to_store(store)
    for k in range(head_margins.shape[1]):
        methods[f"head {k} alone"] = per_context_accuracy(head_margins[:, k], evaluated_labels)

    results = {
        "title": f"MiCRo evaluation of {args.model_name_or_path} on {args.dataset_name}",
        "methods": methods,
        "head_usage": usage,
        "head_accuracy": head_accuracy(head_margins, evaluated_labels),
        "head_agreement": float(head_agreement(head_margins)) if head_margins.shape[1] > 1 else None,
        "model": {"num_heads": model.config.num_heads, "readout": model.config.readout_name},
        "num_pairs": {
            "scored": len(dataset),
            "evaluated": len(evaluated),
            "adaptation": labelled,
            "adaptation_pool": len(adaptation),
        },
        "skipped_rows": skipped,
        "routing": {"rule": args.routing, "per_context": routing_rules} if adaptation else None,
        "user_store": None if args.user_store is None else {"url": args.user_store, "users": stored_users},
        "context_column": text_column,
        "context_label_column": label_column,
        "arguments": vars(args),
    }
    write_report(results, paths["json"].with_suffix(""))
    if card is not None:
        paths["model_card"] = update_model_card(model_path, results, args)
    plot_accuracy_per_context(
        {name: methods[name] for name in methods if not name.startswith("head ")},
        paths["accuracy_plot"],
        title="Pairwise accuracy per context",
    )
    plot_head_usage_heatmap(
        usage[ROUTED]["usage"],
        usage[ROUTED]["contexts"],
        paths["usage_plot"],
        title="Mean router weight per head and context (checkpoint router)",
    )
    return {"results": results, "paths": paths}


def model_card_path(args: EvalArguments) -> Path | None:
    """The card `--update_model_card` updates (a local checkpoint's README.md), checked writable; `None` for none."""
    if not (args.update_model_card and Path(args.model_name_or_path).is_dir()):
        return None
    try:
        return ensure_writable(Path(args.model_name_or_path) / "README.md")
    except OSError as error:
        raise type(error)(f"{error} Pass --update_model_card false to leave the checkpoint's card alone.") from error


def update_model_card(model_path: str, results: dict, args: EvalArguments) -> Path:
    """Add the per-context table (not the single heads' rows) to the checkpoint's card."""
    methods = {name: value for name, value in results["methods"].items() if not name.startswith("head ")}
    counts = results["num_pairs"]
    intro = (
        f"`trl-micro eval` on {counts['evaluated']} pairs of `{data_name(args.dataset_name)}`, grouped by "
        f"`{results['context_label_column']}`"
        + (f" ({counts['adaptation']} more pairs adapted the online router)" if counts["adaptation"] else "")
        + "."
    )
    lines = [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in accuracy_lines(methods)]
    return add_evaluation_section(model_path, args.dataset_name, [intro, "", *lines])


def format_summary(outcome: dict) -> str:
    results, paths = outcome["results"], outcome["paths"]
    lines = [
        f"model: K = {results['model']['num_heads']} heads, readout {results['model']['readout']} "
        "(reward readout @ layer / router readout)"
    ]
    if results.get("skipped_rows"):
        lines.append(f"skipped {results['skipped_rows']} malformed rows (--skip_malformed_rows)")
    for name, accuracy in results["methods"].items():
        if name.startswith("head "):
            continue
        per_context = ", ".join(f"{context} {100 * value:.1f}%" for context, value in accuracy["accuracy"].items())
        lines.append(f"{name}: macro {100 * accuracy['macro']:.1f}% ({per_context})")
    routing = results.get("routing")
    if routing and routing["rule"] == "auto":
        chosen = list(routing["per_context"].values())
        lines.append(
            f"routing auto: mixture weights for {chosen.count('mixture')} of {len(chosen)} contexts, the one-head "
            "posterior for the others"
        )
    if results.get("user_store"):
        lines.append(f"user store: {results['user_store']['users']} users written to {results['user_store']['url']}")
    agreement = results["head_agreement"]
    if agreement is not None:
        lines.append(f"head agreement: {agreement:.2f} (share of evaluated pairs two heads rank alike)")
        if agreement >= HEAD_AGREEMENT_WARNING:
            lines.append(
                "warning: the heads have not separated into distinct tastes, so routing and Stage 2 have little to "
                "choose from; retrain Stage 1 with latent_groups grouping one rater's pairs, longer or with a higher "
                "learning rate, or use num_heads=1"
            )
    best = np.argmax(results["head_accuracy"]["overall"])
    lines.append(f"best single head: {best} ({100 * results['head_accuracy']['overall'][best]:.1f}% overall)")
    lines.append("report: " + ", ".join(str(path) for path in paths.values()))
    return "\n".join(lines)
