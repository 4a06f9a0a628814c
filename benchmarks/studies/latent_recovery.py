"""
Can a label-free fit find a comparison's contexts in its Stage 1 training pairs, and does the objective prefer them?

Stage 1 on frozen features fits a mixture of K linear Bradley-Terry heads with one latent head per latent group (the
trainer's `latent_groups="prompt_chosen"`, see `trl_micro.losses`): it starts from the best of a few EM fits
(`head_init="em"`, `trl_micro.trainer.head_initialization`) and refines them by gradient descent. This study runs
that EM alone, from many starts, to tell the search's limits from the model's.

With `cannot_link`, a rater is taken to be consistent: two groups of one prompt that label the same two responses in
opposite directions (a reversal) cannot share a head, and the E-step instead picks, per prompt, the assignment of its
groups to heads with the highest likelihood among those that keep every such pair of groups apart (hard EM).

Every fit starts either from random soft assignments (`--restarts` of them) or from the true one (each group's context,
a diagnostic that uses the labels), and is reported with its training log-likelihood per pair (the quantity both
optimizers seek; higher is better) and its purity: per head, the share of its groups that come from its most common
context, weighted by the head's groups (1: heads are the contexts; about 1/K: heads unrelated to them). If the start
from the truth ends with a higher likelihood than every random start, the objective prefers the contexts' heads and
what misses them is the search, not the model.

How much of the contexts the features hold at all, labels given: `separability` is the held-out accuracy of a
multinomial logistic regression that predicts a group's context from its mean pair difference (trained on the groups
of a seeded 70% of the prompts, tested on the others). Near the majority share, no fit without labels can find them.

    OMP_NUM_THREADS=2 nice -n 10 python -m benchmarks.studies.latent_recovery --benchmark dsp --data_dir ../shared/data \\
        --output benchmarks/studies/results/latent_recovery_dsp.md
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from benchmarks import start_logging, write_study_report
from benchmarks.harness.pair_pool import CachedPairPool
from benchmarks.harness.plan import (
    add_comparison_arguments,
    load_comparison,
    split_for,
)
from trl_micro.evaluation_reports import ensure_writable
from trl_micro.trainer.head_initialization import (
    fit_mixture_em,
    posterior,
    random_responsibilities,
    standardize,
)

logger = logging.getLogger("benchmarks")

MAX_JOINT_ASSIGNMENTS = 4096  # a prompt whose groups have more head assignments than this is assigned greedily


def reversal_components(
    pool: CachedPairPool, pairs: Sequence[int], groups: torch.Tensor
) -> list[tuple[list[int], list]]:
    """
    Per prompt, its latent groups and the pairs of them that reverse each other (one prefers a to b, the other b to
    a), as (group ids, [(i, j) positions in that list]); prompts without a reversal are left out.
    """
    rows = pool.dataset.select([int(pair) for pair in pairs])
    preferred: dict[int, set] = {}
    prompt_of: dict[int, str] = {}
    for group, prompt, chosen, rejected in zip(groups.tolist(), rows["prompt"], rows["chosen"], rows["rejected"]):
        preferred.setdefault(group, set()).add((str(chosen), str(rejected)))
        prompt_of[group] = str(prompt)
    by_prompt: dict[str, list[int]] = {}
    for group, prompt in prompt_of.items():
        by_prompt.setdefault(prompt, []).append(group)
    components = []
    for members in by_prompt.values():
        edges = [
            (i, j)
            for i, j in itertools.combinations(range(len(members)), 2)
            if any((rejected, chosen) in preferred[members[j]] for chosen, rejected in preferred[members[i]])
        ]
        if edges:
            components.append((members, edges))
    return components


def joint_assignment(group_ll: torch.Tensor, components) -> torch.Tensor:
    """Hard E-step: every group to its likeliest head, except that each prompt with reversals takes the likeliest
    assignment of its groups that gives reversed groups different heads (greedy when there are too many)."""
    num_heads = group_ll.shape[1]
    assigned = F.one_hot(group_ll.argmax(dim=1), num_heads).to(group_ll.dtype)
    for members, edges in components:
        scores = group_ll[members]
        if num_heads ** len(members) <= MAX_JOINT_ASSIGNMENTS:
            options = [
                a
                for a in itertools.product(range(num_heads), repeat=len(members))
                if all(a[i] != a[j] for i, j in edges)
            ]
            if not options:
                continue  # more mutually reversed groups than heads: keep each group's likeliest head
            table = torch.tensor(options)
            best = table[scores.gather(1, table.T).sum(dim=0).argmax()].tolist()
        else:
            best = []
            for position in range(len(members)):
                taken = {best[i] for i, j in edges if j == position and i < position}
                order = scores[position].argsort(descending=True).tolist()
                best.append(next((k for k in order if k not in taken), order[0]))
        assigned[members] = F.one_hot(torch.tensor(best), num_heads).to(group_ll.dtype)
    return assigned


def purity(responsibilities: torch.Tensor, labels: Sequence[str]) -> float:
    """Cluster purity of the (likeliest) heads: per head, how many of its groups share its most common context,
    summed over heads and divided by the number of groups."""
    counts = Counter(zip(responsibilities.argmax(dim=1).tolist(), labels))
    largest: dict[int, int] = {}
    for (head, _), count in counts.items():
        largest[head] = max(largest.get(head, 0), count)
    return sum(largest.values()) / len(labels)


def separability(
    group_features: torch.Tensor, labels: Sequence[str], prompts: Sequence[str], seed: int, lam: float = 1e-2
) -> dict[str, float]:
    """Held-out accuracy of predicting each group's context from `group_features` (G, p), split by prompt, and the
    share of the test groups' most common context (what predicting it always scores)."""
    contexts = sorted(set(labels))
    targets = torch.tensor([contexts.index(label) for label in labels])
    unique_prompts = sorted(set(prompts))
    order = torch.randperm(len(unique_prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    training_prompts = {unique_prompts[i] for i in order[: round(0.7 * len(unique_prompts))]}
    train = torch.tensor([prompt in training_prompts for prompt in prompts])
    if train.all() or not train.any():
        return {"accuracy": float("nan"), "majority": float("nan")}
    weights = torch.zeros(group_features.shape[1], len(contexts), dtype=group_features.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(group_features[train] @ weights, targets[train]) + lam * weights.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (group_features[~train] @ weights).argmax(dim=1)
    test_targets = targets[~train]
    return {
        "accuracy": float((predicted == test_targets).double().mean()),
        "majority": float(torch.bincount(test_targets).max() / len(test_targets)),
    }


def recovery(pool: CachedPairPool, pairs: Sequence[int], num_heads: int, l2s, restarts: int, seed: int):
    """Every fit (random and true starts, with and without cannot-links, every `l2`) on the pool pairs `pairs`, and
    the data's size and separability: (rows, {pairs, groups, prompts_with_reversals, separability})."""
    features = pool.tensors(pairs, with_context=False)
    differences, _ = standardize(features["chosen_reward"] - features["rejected_reward"])
    groups = torch.tensor(pool.latent_groups(pairs, with_context=False))
    num_groups = int(groups.max()) + 1
    labels, prompts = [""] * num_groups, [""] * num_groups
    for group, pair, prompt in zip(groups.tolist(), pairs, pool.dataset.select([int(p) for p in pairs])["prompt"]):
        labels[group], prompts[group] = pool.context_ids[pair], str(prompt)
    group_means = torch.zeros(num_groups, differences.shape[1], dtype=differences.dtype).index_add(
        0, groups, differences
    )
    group_means /= torch.bincount(groups, minlength=num_groups)[:, None]
    separable = separability(group_means, labels, prompts, seed)
    contexts = sorted(set(labels))
    truth = torch.zeros(num_groups, num_heads, dtype=torch.float64)
    truth[torch.arange(num_groups), torch.tensor([contexts.index(label) % num_heads for label in labels])] = 1.0
    components = reversal_components(pool, pairs, groups)
    generator = torch.Generator().manual_seed(seed)
    starts = [("truth", truth)] + [
        (f"random {r}", random_responsibilities(num_groups, num_heads, generator)) for r in range(restarts)
    ]
    e_steps = {False: posterior, True: lambda group_ll, _: joint_assignment(group_ll, components)}
    rows = []
    for l2 in l2s:
        for cannot_link, e_step in e_steps.items():
            for start, responsibilities in starts:
                started = time.perf_counter()
                _, fitted, log_likelihood = fit_mixture_em(differences, groups, responsibilities, l2, e_step)
                rows.append(
                    {
                        "seed": seed,
                        "l2": l2,
                        "cannot_link": cannot_link,
                        "start": start.split()[0],
                        "log_likelihood": log_likelihood,
                        "purity": purity(fitted, labels),
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                )
                logger.info(
                    "seed %d l2 %g cannot_link %s %s: log-likelihood %.4f, purity %.3f",
                    seed,
                    l2,
                    cannot_link,
                    start,
                    log_likelihood,
                    rows[-1]["purity"],
                )
    return rows, {
        "pairs": len(pairs),
        "groups": num_groups,
        "prompts_with_reversals": len(components),
        "separability": separable,
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Per (l2, cannot_link): the true start's and the random starts' results, seed by seed."""
    table = []
    for key in sorted({(row["l2"], row["cannot_link"], row["seed"]) for row in rows}):
        l2, cannot_link, seed = key
        fits = [row for row in rows if (row["l2"], row["cannot_link"], row["seed"]) == key]
        truth = next(row for row in fits if row["start"] == "truth")
        random = [row for row in fits if row["start"] == "random"]
        best = max(random, key=lambda row: row["log_likelihood"])
        table.append(
            {
                "l2": l2,
                "cannot_link": cannot_link,
                "seed": seed,
                "truth_log_likelihood": truth["log_likelihood"],
                "truth_purity": truth["purity"],
                "best_random_log_likelihood": best["log_likelihood"],
                "best_random_purity": best["purity"],
                "max_random_purity": max(row["purity"] for row in random),
                "truth_wins": truth["log_likelihood"] > best["log_likelihood"],
            }
        )
    return table


def render(result: dict, command: str) -> str:
    lines = [
        f"# Latent recovery: {result['title']}",
        "",
        f"Generated by `{command}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; seeds "
        f"{', '.join(map(str, result['seeds']))}. See the docstring of `benchmarks/studies/latent_recovery.py` for the method.",
        "",
        f"K = {result['num_heads']} heads; {result['restarts']} random starts per fit, drawn from the seed. A seed also "
        "draws its split's evaluation pairs; where the training pairs are the same for every seed (they are on every "
        "benchmark of run_all.py), so is the fit from the truth. Per seed: "
        + "; ".join(
            f"seed {seed}: {info['pairs']} training pairs in {info['groups']} latent groups, "
            f"{info['prompts_with_reversals']} prompts with reversed groups"
            for seed, info in result["data"].items()
        )
        + ".",
        "",
        "Context of a group from its features, labels given (`separability`): held-out accuracy "
        + "; ".join(
            f"seed {seed}: {100 * info['separability']['accuracy']:.1f}% (most common context "
            f"{100 * info['separability']['majority']:.1f}%)"
            for seed, info in result["data"].items()
        )
        + ".",
        "",
        "*log-lik.*: penalized training log-likelihood per pair (higher is better); *purity*: per head, the share of its groups from "
        f"its most common context, weighted by its groups (about 1/K = {1 / result['num_heads']:.2f} by chance).",
        "",
        "| l2 | reversals kept apart | seed | from the truth: log-lik. | purity | best random start: log-lik. "
        "| purity | best purity of any random start | truth's optimum is higher |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        lines.append(
            f"| {row['l2']:g} | {'yes' if row['cannot_link'] else 'no'} | {row['seed']} | "
            f"{row['truth_log_likelihood']:.4f} | {row['truth_purity']:.2f} | {row['best_random_log_likelihood']:.4f} | "
            f"{row['best_random_purity']:.2f} | {row['max_random_purity']:.2f} | {'yes' if row['truth_wins'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_comparison_arguments(parser, "latent_recovery.md")
    parser.add_argument(
        "--l2",
        type=float,
        nargs="+",
        default=[0.02, 0.06],
        help="L2 weights of the heads per pair on standardized features (default 0.02, the "
        "trainer's `head_init_l2`, and 0.06).",
    )
    parser.add_argument("--restarts", type=int, default=4, help="Random starts per fit (default 4).")
    args = parser.parse_args(argv)
    if args.restarts < 1:
        parser.error(f"--restarts must be >= 1, got {args.restarts}.")
    if any(l2 <= 0 for l2 in args.l2):
        parser.error(f"--l2 must be > 0, got {args.l2}.")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    start_logging()
    output = ensure_writable(args.output)
    loaded = load_comparison(args.preset, args.benchmark, args.model, args.cache_dir, args.data_dir)
    pool, spec = loaded.pool, loaded.spec
    seeds = args.seeds or loaded.plan.seeds
    rows, data = [], {}
    for seed in seeds:
        split = split_for(pool, spec, seed)
        seed_rows, data[seed] = recovery(pool, split.stage1_train, spec.num_heads, args.l2, args.restarts, seed)
        rows += seed_rows
    result = {
        "title": spec.title,
        "seeds": list(seeds),
        "num_heads": spec.num_heads,
        "restarts": args.restarts,
        "contexts": sorted(set(pool.context_ids[pair] for pair in split.stage1_train)),
        "data": data,
        "fits": rows,
        "summary": summarize(rows),
    }
    write_study_report(output, "benchmarks.studies.latent_recovery", argv, result, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
