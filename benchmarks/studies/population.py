r"""
Many users, few comparisons each: simulated users over DSP's real queries and answers (issue 42).

The simulated population (as PersonalLLM builds its users): each user u is a mixture w_u ~ Dirichlet(alpha 1_4) over
DSP's four domains (academy, business, entertainment, literature); alpha = 0.1 gives nearly pure types, alpha = 1
broad mixtures. A comparison of u is a query and two of its five answers (the four domain styles and the original
"normal" answer, one of the 10 pairs uniformly, in random order); its label is drawn from u's mixture: a domain d ~ w_u
is drawn for that comparison and d's judgment is the label.

How a domain judges a pair. Domain d ranks its own answer first (DSP's label: under context d, d's answer beats the
four others). A pair without d's answer is judged by d's oracle head: a Bradley-Terry linear head on the same frozen
backbone features, fitted on d's own pairs of every kept query (L2 weight chosen on held-out queries), ordering the
other four answers by its reward. So every domain has a full ranking of every query's five answers, and the user's
true probability of preferring a to b is p_u(a > b) = sum_d w_ud [a ranks above b under d].

The full preset reads DSP's first 200 usable queries whose sequences fit in 512 tokens (the backbone pass over all 616
took too long on the shared 2-core machine this ran on). Queries are split per seed: 50% training, 20% adaptation,
30% test (`Preset.query_split`), never a query in two. 1,000
training users each give 4 to 32 comparisons (uniform) on training queries; unseen users give 16 on adaptation queries
and adapt from the first 1, 2, 4, 8, 16; every user is evaluated on all 10 pairs of every test query. Accuracy is the
expected agreement with the user's label, averaged over users: a method that prefers a to b scores p_u(a > b) on
that pair (1 - p_u for b, 1/2 for a tie), so no test label is drawn. The oracle (each user's true preference) scores
max(p_u, 1 - p_u): below 1 wherever a user is a mixture.

Methods, all on the same cached features of the embedded SmolLM2-135M-Instruct (frozen; reward features read as the
library's default readout):

    SingleReward                one BT head on every training comparison (the library's trainer, K = 1)
    SingleReward + residual     per user, a `ResidualHeads` correction fitted on the user's comparisons (lambda
                                cross-validated; needs 2 comparisons, so at 1 the row is SingleReward)
    LoRe-style                  a shared rank-r basis B of linear rewards and per-user weights v_u (r(x, y) =
                                v_u . B^T h(x, y)), fitted jointly by BT with the user ids (L2 chosen on held-out
                                comparisons of the training users); a new user fits only v_u (MAP, Gaussian prior =
                                the training users' weights' mean and covariance)
    MiCRo, no user ids          K = 4 heads + router, the library's default latent grouping (`prompt_chosen`)
    MiCRo, user ids             the same with `latent_groups="user"`: all of a user's pairs share one latent head
    Oracle                      each simulated user's true preference

MiCRo's Stage 2 runs through the user store (`open_user_store("sqlite:///...")`): the one-head posterior by
`record_comparisons` (the feedback path of the server), the per-user mixture weights and the `auto` rule by
`adapt_to_users(..., routing=...).save_to_store(store)`; test margins use the weights read back from the store. A
diagnostic row, "domain heads, true weights", scores sum_d w_ud sigmoid(oracle head d margin): what K = 4 linear heads
could reach if Stage 1 found the domains' heads and Stage 2 knew the user's weights. A second, "domain heads learnt on
the training queries, true weights", does the same with heads learnt from the training queries' pairs labelled by each
domain's judgment: what Stage 1 could reach from these queries if it knew which domain judged every comparison.

    OMP_NUM_THREADS=1 nohup python -m benchmarks.studies.population --data_dir ../shared/data > population.log 2>&1 &
    python -m benchmarks.studies.population --preset smoke --output /tmp/population_smoke.md   # seconds, tiny model

Writes `benchmarks/studies/results/population.md`, `.json` and `.png` (accuracy against comparisons per unseen user,
one panel per alpha). What it shows is how the methods behave on simulated labels over real text; the users are not
real people and every domain's judgment beyond DSP's own labels is a linear head on these features.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from benchmarks import command_line, default_data_dir, stopwatch
from benchmarks.harness.pair_pool import CachedPairPool, build_pair_pool, longest_sequence_lengths
from trl_micro.bundled.dsp import DOMAINS, STYLES, load_dsp_queries
from trl_micro.data_utils import tokenize_pairs
from trl_micro.modeling_micro import MiCRoRewardModel

REPO_ROOT = Path(__file__).resolve().parents[2]

logger = logging.getLogger("benchmarks.studies.population")

RESULTS = REPO_ROOT / "benchmarks" / "studies" / "results" / "population.md"
UNORDERED = list(itertools.combinations(range(len(STYLES)), 2))  # the 10 pairs of a query's five answers


# --------------------------------------------------------------------------------------------------------- presets
@dataclass
class Preset:
    """Sizes of one run (`full` is the report's; `smoke` a tiny random backbone on a few queries, for the test)."""

    model: str = "embedded"
    num_queries: int | None = None  # DSP queries read (a seeded sample; None: all)
    # Only the first N usable queries that fit (in the file's order): the backbone pass over their 1,000 answers took
    # 38 min on the shared 2-core machine this report ran on; all 616 would have taken about 2 h.
    first_queries: int | None = 200
    max_length: int = 512
    train_users: int = 1000
    comparisons: tuple[int, int] = (4, 32)
    unseen_users: int = 100
    # SingleReward + residual is fitted for a seeded sample of the training users and the first unseen users only: each
    # fit cross-validates lambda (37 L-BFGS solves), about 0.5 s a user on the shared 2-core machine
    residual_seen_users: int = 30
    residual_unseen_users: int = 30
    budgets: tuple[int, ...] = (1, 2, 4, 8, 16)
    alphas: tuple[float, ...] = (0.1, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    query_split: tuple[float, float, float] = (0.5, 0.2, 0.3)
    num_heads: int = 4
    lore_rank: int = 4
    lore_steps: int = 400  # Adam steps of each LoRe fit (full batch)
    # MiCRoRewardConfig fields of every head training (the library's defaults otherwise): batches of 64 pairs instead
    # of 8, so that 3 epochs of ~18,000 comparisons take ~850 steps, not ~6,750, on the shared 2-core machine
    head_training: dict = field(default_factory=lambda: {"per_device_train_batch_size": 64})


PRESETS = {
    "full": Preset(),
    "smoke": Preset(
        model="tiny",
        num_queries=12,
        max_length=4096,
        first_queries=None,
        train_users=24,
        comparisons=(4, 8),
        unseen_users=6,
        residual_seen_users=8,
        residual_unseen_users=4,
        lore_steps=50,
        budgets=(1, 2, 4),
        seeds=(0,),
        head_training=dict(num_train_epochs=1, head_init_restarts=1, head_init_l2=[1.0], per_device_train_batch_size=8),
    ),
}


# ----------------------------------------------------------------------------------------------------------- world
@dataclass
class World:
    """DSP's kept queries, their five answers' features, and the four domains' rankings of them."""

    pool: CachedPairPool
    queries: list[int]  # DSP query indices kept
    row: dict  # (query, style a, style b) -> pool row of "a chosen over b"
    reward: torch.Tensor  # (Q, 5, hidden) reward features of each kept query's five answers (query order = `queries`)
    judges: torch.Tensor  # (Q, 4, 5): rank score of answer s under domain d (higher = preferred)
    judge_heads: torch.Tensor  # (4, hidden) the domains' oracle heads
    judge_notes: dict


def load_backbone(preset: Preset, items: list[dict], queries: list[int]):
    """(feature model, tokenizer): the embedded SmolLM2 (frozen), or a tiny random one for the smoke preset."""
    if preset.model == "tiny":
        from trl_micro.testing_utils import build_tiny_micro_model, build_tiny_tokenizer

        texts = [items[q]["query"] for q in queries] + [items[q]["responses"][s] for q in queries for s in STYLES]
        tokenizer = build_tiny_tokenizer(texts, vocab_size=400)
        return build_tiny_micro_model(tokenizer, num_heads=1).eval(), tokenizer
    from transformers import AutoTokenizer

    from trl_micro.bundled.catalog import resolve_model_path

    path = resolve_model_path(preset.model)
    return MiCRoRewardModel.from_backbone(path, num_heads=1).eval(), AutoTokenizer.from_pretrained(path)


def ordered_pairs(items: list[dict], queries: list[int]) -> Dataset:
    """Every query's 20 ordered pairs of distinct answers (a chosen over b), conversational rows."""
    rows = []
    for query in queries:
        prompt = [{"role": "user", "content": items[query]["query"]}]
        for a, b in itertools.permutations(STYLES, 2):
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": items[query]["responses"][a]}],
                    "rejected": [{"role": "assistant", "content": items[query]["responses"][b]}],
                    "context": "",
                    "context_id": f"query-{query}",
                    "query_id": query,
                    "chosen_style": a,
                    "rejected_style": b,
                }
            )
    return Dataset.from_list(rows)


def usable_queries(items: list[dict]) -> list[int]:
    """Queries whose five answers are non-empty and pairwise distinct (every pair carries a preference)."""
    kept = []
    for query, item in enumerate(items):
        answers = [item["responses"][style].strip() for style in STYLES]
        if all(answers) and len(set(answers)) == len(answers):
            kept.append(query)
    return kept


def build_world(preset: Preset, data_dir: str, cache_dir: str | None) -> tuple[World, MiCRoRewardModel, object]:
    items = load_dsp_queries(data_dir)
    queries = usable_queries(items)
    if preset.num_queries is not None:
        queries = sorted(random.Random(0).sample(queries, preset.num_queries))
    model, tokenizer = load_backbone(preset, items, queries)
    if preset.first_queries is not None:  # tokenize a margin more than needed, not every query (slow here)
        queries = queries[: preset.first_queries + max(50, preset.first_queries // 4)]
    candidates = ordered_pairs(items, queries)
    lengths = longest_sequence_lengths(tokenize_pairs(candidates, tokenizer, model.config.context_template, None))
    longest: dict[int, int] = {}
    for query, length in zip(candidates["query_id"], lengths):
        longest[query] = max(longest.get(query, 0), length)
    kept = [query for query in queries if longest[query] <= preset.max_length][: preset.first_queries]
    chosen = set(kept)
    dataset = candidates.filter(lambda row: row["query_id"] in chosen)
    logger.info("%d DSP queries usable, %d kept (fit in %d tokens)", len(queries), len(kept), preset.max_length)
    pool = build_pair_pool(
        model, tokenizer, dataset, cache_dir=cache_dir, num_with_context=0, with_unseen_wordings=False
    )
    row = {
        (query, STYLES.index(a), STYLES.index(b)): index
        for index, (query, a, b) in enumerate(
            zip(dataset["query_id"], dataset["chosen_style"], dataset["rejected_style"])
        )
    }
    reward = torch.stack(
        [
            torch.stack(
                [pool.features.features["chosen_reward"][row[(query, s, (s + 1) % len(STYLES))]] for s in range(5)]
            )
            for query in kept
        ]
    ).double()
    judge_heads, notes = fit_judge_heads(reward, kept)
    judges = domain_rank_scores(reward, judge_heads)
    world = World(pool, kept, row, reward, judges, judge_heads, notes)
    notes.update(describe_judges(world))
    return world, model, tokenizer


# ------------------------------------------------------------------------------------------------- the domains' heads
def logistic_fit(differences: torch.Tensor, l2: float, max_iter: int = 300) -> torch.Tensor:
    """argmin_u mean softplus(-d_i . u) + l2 / 2 ||u||^2 (float64, L-BFGS): a BT head on feature differences."""
    weights = torch.zeros(differences.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-differences @ weights).mean() + 0.5 * l2 * weights.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach()


def standardizer(reward: torch.Tensor) -> torch.Tensor:
    """Per-dimension scale of the answers' reward features (their std over every kept answer), floored."""
    return reward.reshape(-1, reward.shape[-1]).std(0).clamp_min(1e-6)


def own_pair_differences(reward: torch.Tensor, domain: int, query_rows) -> torch.Tensor:
    """h(d's answer) - h(other answer) of domain `domain`'s four own pairs on the queries `query_rows`."""
    own = reward[query_rows, domain]
    others = [s for s in range(len(STYLES)) if s != domain]
    return torch.cat([own - reward[query_rows, s] for s in others])


def fit_head(differences_of, rows: list[int], grid: tuple[float, ...]) -> tuple[torch.Tensor, float, float]:
    """
    A BT head on the standardized feature differences `differences_of(rows)` (preferred minus other answer), its L2
    weight chosen from `grid` by the held-out accuracy on a seeded fifth of `rows`, then refitted on all `rows`.
    Returns (head on standardized features, L2 weight, held-out accuracy).
    """
    order = list(rows)
    random.Random(0).shuffle(order)
    held = order[: max(1, len(order) // 5)]
    fit = order[len(held) :]
    scores = {
        l2: float((differences_of(held) @ logistic_fit(differences_of(fit), l2) > 0).double().mean()) for l2 in grid
    }
    best = max(grid, key=lambda l2: (scores[l2], l2))
    return logistic_fit(differences_of(list(rows)), best), best, scores[best]


def fit_judge_heads(reward: torch.Tensor, queries: list[int]) -> tuple[torch.Tensor, dict]:
    """
    Each domain's oracle head: BT on its own pairs (its answer over each other one) of every kept query, features
    standardized, L2 weight chosen by the held-out accuracy on a seeded fifth of the queries (then refitted on all).
    """
    scale = standardizer(reward)
    scaled = reward / scale
    heads, notes = [], {"l2": {}, "held_out_own_pair_accuracy": {}}
    for domain in range(len(DOMAINS)):
        head, l2, accuracy = fit_head(
            lambda rows: own_pair_differences(scaled, domain, rows), range(len(queries)), (1e-4, 1e-3, 1e-2, 1e-1)
        )
        heads.append(head / scale)
        notes["l2"][DOMAINS[domain]] = l2
        notes["held_out_own_pair_accuracy"][DOMAINS[domain]] = accuracy
    return torch.stack(heads), notes


def learnt_domain_heads(world: World, train_rows: list[int]) -> tuple[torch.Tensor, dict]:
    """
    (4, hidden): each domain's BT head learnt from the 10 pairs of every training query, labelled by that domain's
    own judgment (what a method would learn if it knew which domain judged every comparison); L2 weight chosen on a
    held-out fifth of the training queries.
    """
    scale = standardizer(world.reward)

    def judged_differences(domain, rows):
        pairs = test_pairs(world, rows)  # every pair of the queries `rows`, with the domains' judgments
        sign = 2 * pairs.judgments[:, domain] - 1
        return sign[:, None] * reward_deltas(world, pairs.query, pairs.a, pairs.b) / scale

    heads, l2s = [], {}
    for domain in range(len(DOMAINS)):
        head, l2, _ = fit_head(lambda rows: judged_differences(domain, rows), train_rows, (1e-3, 1e-2, 1e-1, 1.0, 10.0))
        heads.append(head / scale)
        l2s[DOMAINS[domain]] = l2
    return torch.stack(heads), {"l2": l2s}


def domain_rank_scores(reward: torch.Tensor, judge_heads: torch.Tensor) -> torch.Tensor:
    """(Q, 4, 5): domain d's score of each answer: its oracle head's reward, its own answer lifted above all others."""
    scores = torch.einsum("qsh,dh->qds", reward, judge_heads)
    lift = scores.abs().amax() * 4 + 1
    for domain in range(len(DOMAINS)):
        scores[:, domain, domain] += lift
    return scores


def judgments(world: World, query_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4): 1 where domain d prefers answer a to answer b of query row q (0 otherwise)."""
    scores = world.judges[query_rows]  # (N, 4, 5)
    take = torch.arange(len(query_rows))
    return (scores[take, :, a] > scores[take, :, b]).double()


def describe_judges(world: World) -> dict:
    """How often the domains agree on a pair, over every kept query's 10 pairs."""
    votes = test_pairs(world, list(range(len(world.queries)))).judgments.sum(1)
    return {
        "pairs_all_four_domains_agree": float(((votes == 0) | (votes == 4)).double().mean()),
        "pairs_split_two_two": float((votes == 2).double().mean()),
    }


# ------------------------------------------------------------------------------------------------------ population
@dataclass
class Users:
    """Simulated users and their comparisons (one row per comparison, in user order)."""

    ids: list[str]
    weights: torch.Tensor  # (U, 4) float64: each user's mixture over the domains
    user: torch.Tensor  # (N,) index into `ids`
    query: torch.Tensor  # (N,) row of World.queries
    winner: torch.Tensor  # (N,) style index of the chosen answer
    loser: torch.Tensor  # (N,)

    def first(self, count: int) -> Users:
        """Each user's first `count` comparisons (nested: a smaller budget's are a prefix of a larger one's)."""
        keep, seen = [], {}
        for index, user in enumerate(self.user.tolist()):
            seen[user] = seen.get(user, 0) + 1
            if seen[user] <= count:
                keep.append(index)
        index = torch.tensor(keep)
        return Users(self.ids, self.weights, self.user[index], self.query[index], self.winner[index], self.loser[index])

    def of_users(self, users: list[int]) -> Users:
        """The users `users` (indices) and their comparisons, renumbered in that order."""
        position = {user: index for index, user in enumerate(users)}
        keep = torch.tensor([index for index, user in enumerate(self.user.tolist()) if user in position])
        renumbered = torch.tensor([position[user] for user in self.user[keep].tolist()])
        return Users([self.ids[user] for user in users], self.weights[users], renumbered, self.query[keep],
                     self.winner[keep], self.loser[keep])  # fmt: skip

    def comparison_user_ids(self) -> list[str]:
        return [self.ids[user] for user in self.user.tolist()]


def draw_users(
    world: World, query_rows: list[int], weights: torch.Tensor, counts: list[int], rng: np.random.Generator, prefix: str
) -> Users:
    """Comparisons of users with mixtures `weights` (U, 4), `counts[u]` each, on the queries `query_rows`."""
    user = np.repeat(np.arange(len(counts)), counts)
    num = len(user)
    query = rng.choice(np.asarray(query_rows), size=num)
    pair = rng.integers(len(UNORDERED), size=num)
    a = np.array([UNORDERED[p][0] for p in pair])
    b = np.array([UNORDERED[p][1] for p in pair])
    flip = rng.random(num) < 0.5
    a, b = np.where(flip, b, a), np.where(flip, a, b)
    cumulative = np.cumsum(weights.numpy()[user], axis=1)
    domain = np.minimum((cumulative < rng.random(num)[:, None]).sum(1), len(DOMAINS) - 1)
    scores = world.judges.numpy()[query, domain]  # (N, 5)
    prefers_a = scores[np.arange(num), a] > scores[np.arange(num), b]
    winner, loser = np.where(prefers_a, a, b), np.where(prefers_a, b, a)
    ids = [f"{prefix}-{index}" for index in range(len(counts))]
    as_tensor = lambda values: torch.as_tensor(values, dtype=torch.long)  # noqa: E731
    return Users(ids, weights, as_tensor(user), as_tensor(query), as_tensor(winner), as_tensor(loser))


def dirichlet(alpha: float, count: int, rng: np.random.Generator) -> torch.Tensor:
    weights = rng.dirichlet([alpha] * len(DOMAINS), size=count)
    weights = np.clip(weights, 1e-12, None)
    return torch.as_tensor(weights / weights.sum(1, keepdims=True), dtype=torch.float64)


def split_queries(num_queries: int, shares: tuple[float, float, float], seed: int) -> tuple[list[int], ...]:
    """Seeded (train, adaptation, test) query rows; every query in exactly one."""
    order = list(range(num_queries))
    random.Random(seed).shuffle(order)
    num_train = round(shares[0] * num_queries)
    num_adaptation = round(shares[1] * num_queries)
    return order[:num_train], order[num_train : num_train + num_adaptation], order[num_train + num_adaptation :]


@dataclass
class TestPairs:
    """Every test query's 10 pairs, a (lower style index) against b."""

    query: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    judgments: torch.Tensor  # (P, 4)

    def probability(self, weights: torch.Tensor) -> torch.Tensor:
        """(P, U): each user's true probability of preferring a to b."""
        return self.judgments @ weights.T


def test_pairs(world: World, test_rows: list[int]) -> TestPairs:
    """Every pair of the queries `test_rows` (10 each), with each domain's judgment of it."""
    query = torch.tensor(test_rows).repeat_interleave(len(UNORDERED))
    a = torch.tensor([pair[0] for pair in UNORDERED]).repeat(len(test_rows))
    b = torch.tensor([pair[1] for pair in UNORDERED]).repeat(len(test_rows))
    return TestPairs(query, a, b, judgments(world, query, a, b))


def expected_accuracy(margins: torch.Tensor, probability: torch.Tensor) -> torch.Tensor:
    """(U,): mean over pairs of the chance that the user's label agrees with the sign of `margins` (P, U) or (P,)."""
    if margins.dim() == 1:
        margins = margins[:, None].expand_as(probability)
    margins = margins.double()
    agree = torch.where(margins > 0, probability, torch.where(margins < 0, 1 - probability, 0.5))
    return agree.mean(0)


# -------------------------------------------------------------------------------------------------------- features
def pool_rows(world: World, query: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Pool rows of "a chosen over b" for query rows `query`."""
    queries = world.queries
    return [world.row[(queries[q], x, y)] for q, x, y in zip(query.tolist(), a.tolist(), b.tolist())]


def reward_deltas(world: World, query: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, hidden) float64: h(a) - h(b) of each query's answers."""
    return world.reward[query, a] - world.reward[query, b]


# --------------------------------------------------------------------------------------------------------- LoRe
@dataclass
class LoRe:
    """A LoRe-style model: a shared rank-r basis of linear rewards, per-user weights (see the module docstring)."""

    basis: torch.Tensor  # (hidden, r), on standardized features
    user_weights: torch.Tensor  # (U, r)
    scale: torch.Tensor  # (hidden,) feature standardization
    l2: float

    def projected(self, deltas: torch.Tensor) -> torch.Tensor:
        return (deltas / self.scale) @ self.basis

    def prior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and inverse covariance of the training users' weights: a new user's Gaussian prior."""
        mean = self.user_weights.mean(0)
        centered = self.user_weights - mean
        covariance = centered.T @ centered / max(1, len(centered) - 1)
        covariance = covariance + 1e-3 * covariance.diagonal().mean() * torch.eye(len(mean), dtype=torch.float64)
        return mean, torch.linalg.inv(covariance)


def fit_lore_once(deltas, user, num_users, rank, l2, seed, steps=400) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(deltas.shape[1], rank, generator=generator, dtype=torch.float64) / math.sqrt(deltas.shape[1])
    weights = torch.randn(num_users, rank, generator=generator, dtype=torch.float64)
    basis.requires_grad_(True)
    weights.requires_grad_(True)
    optimizer = torch.optim.Adam([basis, weights], lr=2e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        margins = ((deltas @ basis) * weights[user]).sum(1)
        loss = torch.nn.functional.softplus(-margins).mean()
        loss = loss + l2 * (basis.pow(2).sum() + weights.pow(2).sum(1).mean())
        loss.backward()
        optimizer.step()
    return basis.detach(), weights.detach()


def fit_lore(world: World, users: Users, rank: int, seed: int, steps: int = 400) -> tuple[LoRe, dict]:
    """Basis and weights by BT with the user ids; L2 chosen on each user's last quarter of comparisons (held out)."""
    scale = standardizer(world.reward)
    deltas = reward_deltas(world, users.query, users.winner, users.loser) / scale
    position, counts = [], {}
    for user in users.user.tolist():
        counts[user] = counts.get(user, 0) + 1
        position.append(counts[user])
    totals = torch.bincount(users.user)
    held = torch.tensor([p > totals[u] - max(1, totals[u] // 4) for p, u in zip(position, users.user.tolist())])
    scores = {}
    for l2 in (1e-4, 1e-3, 1e-2):
        basis, weights = fit_lore_once(deltas[~held], users.user[~held], len(users.ids), rank, l2, seed, steps)
        margins = ((deltas[held] @ basis) * weights[users.user[held]]).sum(1)
        scores[l2] = float(torch.nn.functional.softplus(-margins).mean())
    best = min(scores, key=scores.get)
    basis, weights = fit_lore_once(deltas, users.user, len(users.ids), rank, best, seed, steps)
    return LoRe(basis, weights, scale, best), {"held_out_nll": scores, "l2": best}


def lore_new_users(lore: LoRe, world: World, users: Users, iterations: int = 50) -> torch.Tensor:
    """
    (U, r): each new user's MAP weights under the training users' Gaussian prior: damped Newton (step halved until the
    user's objective decreases), all users at once.
    """
    mean, precision = lore.prior()
    projected = lore.projected(reward_deltas(world, users.query, users.winner, users.loser))  # (N, r)
    num_users = len(users.ids)

    def objectives(weights):
        margins = (projected * weights[users.user]).sum(1)
        centered = weights - mean
        prior = 0.5 * ((centered @ precision) * centered).sum(1)
        return prior.index_add(0, users.user, torch.nn.functional.softplus(-margins))

    weights = mean.repeat(num_users, 1)
    current = objectives(weights)
    for _ in range(iterations):
        margins = (projected * weights[users.user]).sum(1)
        residual = torch.sigmoid(-margins)  # d/dm of -log sigmoid(m) is -sigmoid(-m)
        curvature = torch.sigmoid(margins) * residual
        gradient = ((weights - mean) @ precision).index_add(0, users.user, -residual[:, None] * projected)
        outer = curvature[:, None, None] * projected[:, :, None] * projected[:, None, :]
        hessian = precision.repeat(num_users, 1, 1).index_add(0, users.user, outer)
        step = torch.linalg.solve(hessian, gradient[:, :, None])[:, :, 0]
        size = torch.ones(num_users, 1, dtype=torch.float64)
        for _ in range(30):
            candidate = weights - size * step
            value = objectives(candidate)
            worse = value > current + 1e-12
            if not bool(worse.any()):
                break
            size[worse] /= 2
        improved = value <= current + 1e-12
        weights = torch.where(improved[:, None], candidate, weights)
        current = torch.where(improved, value, current)
        if float((size * step).abs().max()) < 1e-10:
            break
    return weights


# ------------------------------------------------------------------------------------------------------- Stage 2
def store_comparisons(world: World, users: Users) -> list:
    from trl_micro.personalization.stores import Comparison

    dataset = world.pool.dataset
    rows = pool_rows(world, users.query, users.winner, users.loser)
    texts = dataset.select(rows)
    ids = users.comparison_user_ids()
    return [
        Comparison(user, prompt, chosen, rejected)
        for user, prompt, chosen, rejected in zip(ids, texts["prompt"], texts["chosen"], texts["rejected"])
    ]


def micro_user_weights(
    model: MiCRoRewardModel, world: World, users: Users, folder: Path, rules: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
    """
    `{rule: (U, K) weights read back from a user store}` of `users` after Stage 2 on their comparisons, the seconds
    each rule took (store writes included), and the largest difference between the store's posterior (recorded
    comparison by comparison) and `adapt_to_users(routing="posterior")`'s.
    """
    from benchmarks.harness.comparison import score
    from trl_micro.personalization.adaptation import adapt_to_users, router_priors
    from trl_micro.personalization.stores import open_user_store

    rows = pool_rows(world, users.query, users.winner, users.loser)
    scores = score(model, world.pool, rows, with_context=False)
    ids = users.comparison_user_ids()
    weights, seconds = {}, {}
    check = None
    for rule in rules:
        url = f"sqlite:///{folder / f'users-{rule}.db'}"
        started = time.perf_counter()
        store = open_user_store(url, num_heads=model.num_heads)
        if rule == "posterior":  # the feedback path: every comparison recorded and applied in the store
            priors = router_priors(ids, scores.mixture_weights)
            store.record_comparisons(
                store_comparisons(world, users), scores.head_margins, torch.stack([priors[user] for user in ids])
            )
        else:
            adapt_to_users(ids, scores, routing=rule, residual_heads=False).save_to_store(store)
        stored = store.weights(users.ids)
        seconds[rule] = time.perf_counter() - started
        store.close()
        weights[rule] = torch.stack([stored[user] for user in users.ids]).double()
        if rule == "posterior":
            direct = adapt_to_users(ids, scores, routing="posterior", residual_heads=False).online_router
            reference = torch.stack([direct.weights(user, dtype=torch.float64) for user in users.ids])
            check = float((reference - weights[rule]).abs().max())
    return weights, seconds, check


def residual_vectors(single: MiCRoRewardModel, world: World, users: Users) -> torch.Tensor:
    """(U, hidden): SingleReward + a `ResidualHeads` residual per user, fitted on the user's comparisons."""
    from benchmarks.harness.comparison import score
    from trl_micro.personalization.adaptation import fit_online_router, fit_residual_heads

    rows = pool_rows(world, users.query, users.winner, users.loser)
    scores = score(single, world.pool, rows, with_context=False)
    ids = users.comparison_user_ids()
    router = fit_online_router(ids, scores.head_margins)
    residuals = fit_residual_heads(router, ids, scores.head_margins, scores.feature_deltas, cv_folds=4)
    return torch.stack([residuals.residual(user) for user in users.ids])


# ---------------------------------------------------------------------------------------------------------- methods
SINGLE = "SingleReward"
SINGLE_RESIDUAL = "SingleReward + residual"
LORE = "LoRe-style (rank {rank})"
MICRO_PLAIN = "MiCRo, no user ids"
MICRO_USERS = "MiCRo, user ids"
ORACLE = "Oracle (true preference)"
TRUE_HEADS = "domain heads, true weights (diagnostic)"
LEARNT_HEADS = "domain heads learnt on the training queries, true weights (diagnostic)"
RULES = ("posterior", "mixture", "auto")


def micro_name(variant: str, rule: str) -> str:
    return f"{variant} ({rule})"


def run_seed(world: World, model, tokenizer, preset: Preset, alpha: float, seed: int, workdir: Path) -> dict:
    """One alpha and seed: draw the population, train every method, evaluate seen and unseen users."""
    from benchmarks.harness.comparison import HeadTraining, score, train_heads

    rng = np.random.default_rng([seed, int(round(alpha * 1000))])
    train_rows, adaptation_rows, test_rows = split_queries(len(world.queries), preset.query_split, seed)
    low, high = preset.comparisons
    counts = rng.integers(low, high + 1, size=preset.train_users).tolist()
    seen = draw_users(world, train_rows, dirichlet(alpha, preset.train_users, rng), counts, rng, "user")
    budget = max(preset.budgets)
    unseen = draw_users(
        world, adaptation_rows, dirichlet(alpha, preset.unseen_users, rng), [budget] * preset.unseen_users, rng, "new"
    )
    tests = test_pairs(world, test_rows)
    test_rows_pool = pool_rows(world, tests.query, tests.a, tests.b)
    test_deltas = reward_deltas(world, tests.query, tests.a, tests.b)
    seen_probability, unseen_probability = tests.probability(seen.weights), tests.probability(unseen.weights)
    result = {"seen": {}, "unseen": {}, "seconds": {}, "per_new_user_ms": {}, "diagnostics": {}}
    result["sizes"] = {
        "train_queries": len(train_rows),
        "adaptation_queries": len(adaptation_rows),
        "test_queries": len(test_rows),
        "train_comparisons": len(seen.user),
        "test_pairs_per_user": len(tests.query),
    }

    def seen_accuracy(name, margins):
        result["seen"][name] = float(expected_accuracy(margins, seen_probability).mean())

    def unseen_accuracy(name, count, margins):
        result["unseen"].setdefault(name, {})[count] = float(expected_accuracy(margins, unseen_probability).mean())

    def timed(name):
        return stopwatch(result["seconds"], name)

    training = HeadTraining()
    overrides = dict(preset.head_training)
    train_pool_rows = pool_rows(world, seen.query, seen.winner, seen.loser)
    backbone = model.backbone

    # Oracle and the diagnostic
    seen_accuracy(ORACLE, seen_probability - 0.5)
    true_heads = torch.sigmoid(test_deltas @ world.judge_heads.T)  # (P, 4)
    seen_accuracy(TRUE_HEADS, true_heads @ seen.weights.T - 0.5)
    learnt, notes = learnt_domain_heads(world, train_rows)
    result["diagnostics"]["domain heads learnt on the training queries"] = notes
    learnt_heads = torch.sigmoid(test_deltas @ learnt.T)
    seen_accuracy(LEARNT_HEADS, learnt_heads @ seen.weights.T - 0.5)
    for count in preset.budgets:
        unseen_accuracy(ORACLE, count, unseen_probability - 0.5)
        unseen_accuracy(TRUE_HEADS, count, true_heads @ unseen.weights.T - 0.5)
        unseen_accuracy(LEARNT_HEADS, count, learnt_heads @ unseen.weights.T - 0.5)

    # SingleReward (+ residual)
    with timed(SINGLE):
        single = train_heads(backbone, tokenizer, world.pool, train_pool_rows, training, seed, num_heads=1,
                             config_overrides=overrides)  # fmt: skip
    single_test = score(single, world.pool, test_rows_pool, with_context=False).margins.double()
    seen_accuracy(SINGLE, single_test)
    started = time.perf_counter()
    sample = sorted(rng.choice(len(seen.ids), size=min(preset.residual_seen_users, len(seen.ids)), replace=False))
    sampled = seen.of_users(sample)
    residuals = residual_vectors(single, world, sampled)
    result["seconds"][f"{SINGLE_RESIDUAL}, {len(sample)} training users"] = time.perf_counter() - started
    test_features = score(single, world.pool, test_rows_pool, with_context=False).feature_deltas.double()
    margins = single_test[:, None] + test_features @ residuals.T
    result["seen"][SINGLE_RESIDUAL] = float(expected_accuracy(margins, seen_probability[:, sample]).mean())
    result["seen_residual_sample"] = {
        "users": len(sample),
        SINGLE: float(expected_accuracy(single_test, seen_probability[:, sample]).mean()),
    }
    for count in preset.budgets:
        unseen_accuracy(SINGLE, count, single_test)
        if count < 2:
            unseen_accuracy(SINGLE_RESIDUAL, count, single_test)
            continue
        started = time.perf_counter()
        few = list(range(min(preset.residual_unseen_users, len(unseen.ids))))
        residuals = residual_vectors(single, world, unseen.of_users(few).first(count))
        elapsed = time.perf_counter() - started
        result["per_new_user_ms"].setdefault(SINGLE_RESIDUAL, {})[count] = 1000 * elapsed / len(few)
        margins = single_test[:, None] + test_features @ residuals.T
        result["unseen"].setdefault(SINGLE_RESIDUAL, {})[count] = float(
            expected_accuracy(margins, unseen_probability[:, few]).mean()
        )
        result["unseen"].setdefault(f"{SINGLE} on those {len(few)} users", {})[count] = float(
            expected_accuracy(single_test, unseen_probability[:, few]).mean()
        )

    # LoRe-style
    lore_name = LORE.format(rank=preset.lore_rank)
    with timed(lore_name):
        lore, notes = fit_lore(world, seen, preset.lore_rank, seed, preset.lore_steps)
    result["diagnostics"]["lore"] = notes
    lore_test = lore.projected(test_deltas)  # (P, r)
    seen_accuracy(lore_name, lore_test @ lore.user_weights.T)
    for count in preset.budgets:
        started = time.perf_counter()
        weights = lore_new_users(lore, world, unseen.first(count))
        result["per_new_user_ms"].setdefault(lore_name, {})[count] = (
            1000 * (time.perf_counter() - started) / len(unseen.ids)
        )
        unseen_accuracy(lore_name, count, lore_test @ weights.T)

    # MiCRo, without and with user ids
    variants = {MICRO_PLAIN: ({}, {}), MICRO_USERS: user_grouping(seen)}
    for variant, (extra_columns, config) in variants.items():
        with timed(variant):
            micro = train_heads(backbone, tokenizer, world.pool, train_pool_rows, training, seed,
                                num_heads=preset.num_heads, extra_columns=extra_columns,
                                config_overrides={**overrides, **config})  # fmt: skip
        head_test = score(micro, world.pool, test_rows_pool, with_context=False).head_margins.double()
        result["diagnostics"][f"{variant}: best head per domain, test pairs"] = best_heads_per_domain(head_test, tests)
        folder = Path(tempfile.mkdtemp(prefix="population-", dir=workdir))
        weights, seconds, check = micro_user_weights(micro, world, seen, folder, RULES)
        result["diagnostics"][f"{variant}: store posterior vs adapt_to_users, max abs difference"] = check
        for rule in RULES:
            result["seconds"][f"{micro_name(variant, rule)}, Stage 2 of the training users"] = seconds[rule]
            seen_accuracy(micro_name(variant, rule), head_test @ weights[rule].T)
        for count in preset.budgets:
            folder = Path(tempfile.mkdtemp(prefix="population-", dir=workdir))
            weights, seconds, _ = micro_user_weights(micro, world, unseen.first(count), folder, RULES)
            for rule in RULES:
                name = micro_name(variant, rule)
                result["per_new_user_ms"].setdefault(name, {})[count] = 1000 * seconds[rule] / len(unseen.ids)
                unseen_accuracy(name, count, head_test @ weights[rule].T)
    return result


def user_grouping(users: Users) -> tuple[dict, dict]:
    """Training column and config of MiCRo with user ids: `latent_groups="user"`, one latent head per user."""
    return {"user_id": users.comparison_user_ids()}, {"latent_groups": "user", "user_column": "user_id"}


def best_heads_per_domain(head_margins: torch.Tensor, tests: TestPairs) -> dict[str, float]:
    """Per domain, the accuracy of the head that best follows that domain's judgments on the test pairs."""
    agree = ((head_margins[:, :, None] > 0).double() == tests.judgments[:, None, :]).double().mean(0)  # (K, 4)
    return {domain: float(agree[:, d].max()) for d, domain in enumerate(DOMAINS)}


# ----------------------------------------------------------------------------------------------------------- report
def mean_std(values) -> tuple[float, float]:
    values = [float(value) for value in values]
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: dict) -> dict:
    """`{alpha: {"seen": {method: (mean, std)}, "unseen": {method: {count: (mean, std)}}, "per_new_user_ms": ...}}`."""
    summary = {}
    for alpha, seeds in runs.items():
        results = list(seeds.values())
        first = results[0]
        summary[alpha] = {
            "seen": {name: mean_std([r["seen"][name] for r in results]) for name in first["seen"]},
            "unseen": {
                name: {count: mean_std([r["unseen"][name][count] for r in results]) for count in first["unseen"][name]}
                for name in first["unseen"]
            },
            "per_new_user_ms": {
                name: {count: float(np.mean([r["per_new_user_ms"][name][count] for r in results])) for count in counts}
                for name, counts in first["per_new_user_ms"].items()
            },
            "seeds": len(results),
        }
    return summary


def method_names(preset: Preset) -> list[str]:
    names = [SINGLE, SINGLE_RESIDUAL, LORE.format(rank=preset.lore_rank)]
    names += [micro_name(variant, rule) for variant in (MICRO_PLAIN, MICRO_USERS) for rule in RULES]
    return [*names, ORACLE, TRUE_HEADS, LEARNT_HEADS]


def goals(summary: dict, preset: Preset) -> list[dict]:
    """The issue's goals, each with its figures and met / missed."""
    lore = LORE.format(rank=preset.lore_rank)
    outcome = []
    if "0.1" in summary:
        seen = summary["0.1"]["seen"]
        single, oracle = seen[SINGLE][0], seen[ORACLE][0]

        def closed(accuracy):
            return (accuracy - single) / (oracle - single) if oracle > single else float("nan")

        ceiling = ""
        if LEARNT_HEADS in seen:
            learnt = seen[LEARNT_HEADS][0]
            ceiling = (
                f" (the domain heads learnt on the training queries, with each user's true weights: "
                f"{100 * learnt:.1f}, {closed(learnt):.2f} of the gap)"
            )
        for rule in RULES:
            micro = seen[micro_name(MICRO_USERS, rule)][0]
            outcome.append(
                {
                    "goal": f"alpha=0.1, seen users: MiCRo with user ids ({rule}) closes >= 0.9 of the "
                    "SingleReward -> oracle gap",
                    "figures": f"SingleReward {100 * single:.1f}, MiCRo {100 * micro:.1f}, oracle {100 * oracle:.1f}: "
                    f"{closed(micro):.2f} of the gap{ceiling}",
                    "met": bool(closed(micro) >= 0.9),
                }
            )
        unseen = summary["0.1"]["unseen"]
        if 4 in unseen[SINGLE]:
            for rule in RULES:
                micro = unseen[micro_name(MICRO_USERS, rule)][4]
                for baseline in (SINGLE_RESIDUAL, lore):
                    other = unseen[baseline][4]
                    spread = max(micro[1], other[1])
                    outcome.append(
                        {
                            "goal": f"alpha=0.1, unseen users, 4 comparisons: MiCRo with user ids ({rule}) above "
                            f"{baseline} by more than the seed spread",
                            "figures": f"{100 * micro[0]:.1f} ± {100 * micro[1]:.1f} vs {100 * other[0]:.1f} ± "
                            f"{100 * other[1]:.1f} (difference {100 * (micro[0] - other[0]):+.1f}, spread = the "
                            f"larger std, {100 * spread:.1f})",
                            "met": bool(micro[0] - other[0] > spread),
                        }
                    )
    else:
        for goal in (
            "alpha=0.1, seen users: MiCRo with user ids closes >= 0.9 of the SingleReward -> oracle gap",
            "alpha=0.1, unseen users, 4 comparisons: MiCRo with user ids above SingleReward + residual and above "
            "the LoRe-style model by more than the seed spread",
        ):
            outcome.append({"goal": goal, "figures": "alpha = 0.1 is not in this report (not run)", "met": None})
    if "1.0" in summary:
        unseen = summary["1.0"]["unseen"]
        for variant in (MICRO_USERS, MICRO_PLAIN):
            for rule in ("mixture", "auto"):
                rows = unseen[micro_name(variant, rule)]
                posterior = unseen[micro_name(variant, "posterior")]
                differences = {count: rows[count][0] - posterior[count][0] for count in rows}
                text = ", ".join(f"{count}: {100 * value:+.1f}" for count, value in differences.items())
                outcome.append(
                    {
                        "goal": f"alpha=1, unseen users, {variant}: {rule} weights at least as good as the one-head "
                        "posterior on every budget",
                        "figures": f"{rule} minus posterior, points, per budget: {text}",
                        "met": all(value >= 0 for value in differences.values()),
                    }
                )
    return outcome


def cell(value: tuple[float, float], seeds: int) -> str:
    mean, std = value
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if seeds > 1 else f"{100 * mean:.1f}"


def render(result: dict) -> str:
    summary, preset = result["summary"], Preset(**result["preset"])
    names = method_names(preset)
    lines = [
        "# Many users, few comparisons each: simulated users over DSP (issue 42)",
        "",
        f"Command: `{result['command']}`",
        "",
        *[f"Runs made by: `{command}`" for command in result.get("merged_from", []) if command != result["command"]],
        "",
        "Protocol: see the docstring of benchmarks/studies/population.py. Each user is a Dirichlet(alpha) mixture over "
        "DSP's four domains; each label is drawn from the user's mixture. A domain ranks its own answer first (DSP's "
        "label) and the other four answers by its oracle head, a BT linear head on the same frozen features fitted "
        "on its own pairs. Accuracy is the expected agreement with the user's label over every pair of the test "
        "queries, averaged over users; mean ± std over seeds.",
        "",
        f"Sizes (per seed): {json.dumps(result['sizes'])}; {preset.train_users} training users with "
        f"{preset.comparisons[0]} to {preset.comparisons[1]} comparisons each, {preset.unseen_users} unseen users; "
        f"seeds {list(preset.seeds)}. Domain oracle heads: {json.dumps(result['judges'])}.",
        "",
    ]
    for alpha, part in summary.items():
        seeds = part["seeds"]
        lines += [f"## alpha = {alpha}: unseen users, accuracy (%) against comparisons per user", ""]
        counts = list(part["unseen"][SINGLE])
        header = ["method", *[f"{count}" for count in counts]]
        rows = [[name, *[cell(part["unseen"][name][count], seeds) for count in counts]] for name in names]
        lines += markdown_lines(header, rows) + [""]
        sampled = next((name for name in part["unseen"] if name.startswith(f"{SINGLE} on those")), None)
        if sampled is not None:
            figures = ", ".join(f"{count}: {cell(value, seeds)}" for count, value in part["unseen"][sampled].items())
            lines += [
                f"{SINGLE_RESIDUAL} is fitted for the first {sampled.split()[-2]} unseen users only (lambda is "
                f"cross-validated per user, about 0.5 s a user here); SingleReward on those same users: {figures}.",
                "",
            ]
        lines += [f"## alpha = {alpha}: training (seen) users, accuracy (%) on the test queries", ""]
        single, oracle = part["seen"][SINGLE][0], part["seen"][ORACLE][0]
        rows = []
        for name in names:
            closed = (part["seen"][name][0] - single) / (oracle - single) if oracle > single else float("nan")
            rows.append([name, cell(part["seen"][name], seeds), f"{closed:.2f}"])
        lines += markdown_lines(["method", "accuracy", "gap closed"], rows) + [""]
        samples = [run["seen_residual_sample"] for run in result["runs"][alpha].values()]
        lines += [
            f"{SINGLE_RESIDUAL} is fitted and scored on a seeded sample of {samples[0]['users']} training users (about "
            f"0.5 s a user); SingleReward on the same samples: "
            + ", ".join(f"{100 * sample[SINGLE]:.1f}" for sample in samples)
            + ".",
            "",
        ]
    lines += ["## Goals of the issue", ""]
    for goal in result["goals"]:
        verdict = "NOT MEASURED" if goal["met"] is None else "MET" if goal["met"] else "MISSED"
        lines.append(f"- {verdict}: {goal['goal']}. {goal['figures']}.")
    if any(part["seeds"] < 2 for part in summary.values()):
        lines.append("- One seed only: no seed spread; a difference of a few tenths of a point may not hold up.")
    lines += ["", "## What each method costs per new user", ""]
    first = next(iter(summary.values()))
    counts = [count for count in first["per_new_user_ms"].get(micro_name(MICRO_USERS, "posterior"), {})]
    rows = []
    state = {
        SINGLE_RESIDUAL: "hidden-size vector + lambda",
        LORE.format(rank=preset.lore_rank): f"{preset.lore_rank} weights",
    }
    for name in names:
        if name not in first["per_new_user_ms"]:
            continue
        per = first["per_new_user_ms"][name]
        kept = state.get(name, f"{preset.num_heads} log-weights + {preset.num_heads} log-prior rows in the store")
        rows.append([name, *[f"{per[count]:.1f}" if count in per else "–" for count in counts], kept])
    lines += [
        "Stage 2 wall time per new user (ms, first alpha, mean over seeds; MiCRo's includes writing the user store and "
        "reading the weights back; SingleReward + residual's includes cross-validating lambda). SingleReward costs "
        "nothing per user and keeps nothing.",
        "",
    ]
    lines += markdown_lines(["method", *[f"{count} comparisons" for count in counts], "state per user"], rows) + [""]
    lines += ["## Timings and diagnostics", ""]
    for alpha, seeds in result["runs"].items():
        for seed, run in seeds.items():
            timings = ", ".join(f"{name} {value:.0f} s" for name, value in run["seconds"].items())
            lines.append(f"- alpha {alpha}, seed {seed}: {timings}.")
            for name, value in run["diagnostics"].items():
                lines.append(f"  - {name}: {json.dumps(value)}")
    lines += ["", *WHAT_IT_SHOWS, ""]
    return "\n".join(lines)


WHAT_IT_SHOWS = [
    "## What this does and does not show",
    "",
    "- The text is real (DSP's Alpaca queries and their five answers, read by the frozen SmolLM2-135M-Instruct); the "
    "users are simulated. A label is a draw from a mixture of four deterministic domain rankings, so the population "
    "has exactly the structure MiCRo's heads assume (a few tastes, each user a mix of them). Real raters' tastes "
    "need not be a mixture of four, nor stay fixed, nor be free of noise within a taste.",
    "- Beyond DSP's own labels (a domain prefers its own answer), a domain's judgment is a linear head on the same "
    "features the methods read; that part of every user's taste is linear in the features by construction.",
    "- The oracle knows each user's mixture exactly; it is below 100% wherever a user is a mixture (alpha = 1).",
    "- The oracle and the domains' own heads were fitted on every kept query, the test queries included; a method "
    'learns from the training queries only. The row "domain heads learnt on the training queries" is what '
    "BT linear heads learnt from those queries reach when every comparison's judging domain and every user's "
    "weights are known: a reference for how much of the oracle gap learning from these queries can close.",
    "- Every method reads the same cached features; none tunes the backbone.",
]


def markdown_lines(header, rows) -> list[str]:
    from trl_micro.evaluation_reports import markdown_table

    return markdown_table(header, rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, preset = result["summary"], Preset(**result["preset"])
    shown = [SINGLE, SINGLE_RESIDUAL, LORE.format(rank=preset.lore_rank), micro_name(MICRO_PLAIN, "posterior"),
             *[micro_name(MICRO_USERS, rule) for rule in RULES], ORACLE]  # fmt: skip
    figure, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4.5), squeeze=False)
    for axis, (alpha, part) in zip(axes[0], summary.items()):
        for name in shown:
            counts = list(part["unseen"][name])
            means = [100 * part["unseen"][name][count][0] for count in counts]
            stds = [100 * part["unseen"][name][count][1] for count in counts]
            style = "--" if name in (SINGLE, ORACLE) else "-"
            axis.errorbar(counts, means, yerr=stds, label=name, linestyle=style, marker="o", capsize=3)
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(count) for count in counts])
        axis.set_xlabel("comparisons per unseen user")
        axis.set_ylabel("expected accuracy (%)")
        axis.set_title(f"alpha = {alpha}")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--data_dir", default=default_data_dir(), help="Real data folder (default ../shared/data).")
    parser.add_argument("--cache_dir", default=None, help="Feature store root (default $TRL_MICRO_CACHE).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Seeds (default: the preset's).")
    parser.add_argument("--alphas", type=float, nargs="+", default=None, help="Dirichlet alphas (default 0.1 1).")
    parser.add_argument("--features_only", action="store_true", help="Only compute and cache the backbone features.")
    parser.add_argument("--resume", action="store_true", help="Keep the (alpha, seed) runs the JSON report has.")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        help="JSON reports of runs made apart (e.g. one process per alpha, same preset): their runs are kept as done.",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--output", default=str(RESULTS), help="Markdown report; .json and .png go next to it.")
    return parser.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.seeds is not None or args.alphas is not None:
        preset = Preset(**{**vars(preset), "seeds": tuple(args.seeds or preset.seeds),
                           "alphas": tuple(args.alphas or preset.alphas)})  # fmt: skip
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    json_path = output.with_suffix(".json")
    runs: dict = {}
    sources = [*([json_path] if args.resume and json_path.exists() else []), *map(Path, args.merge)]
    merged_commands, judges = [], None
    for source in sources:
        found = json.loads(source.read_text())
        if found["preset"]["train_users"] != preset.train_users or found["preset"]["budgets"] != list(preset.budgets):
            raise ValueError(f"{source} was run with another preset than --preset {args.preset}: cannot merge it.")
        merged_commands.append(found["command"])
        judges = found["judges"]
        for alpha, seeds in found["runs"].items():
            for seed, run in seeds.items():
                runs.setdefault(alpha, {})[seed] = convert_counts(run)
    todo = [(seed, alpha) for seed in preset.seeds for alpha in preset.alphas
            if str(seed) not in runs.get(str(float(alpha)), {})]  # fmt: skip
    world = model = tokenizer = None
    if todo or args.features_only or judges is None:  # a report of runs made apart needs no backbone
        started = time.perf_counter()
        world, model, tokenizer = build_world(preset, args.data_dir, args.cache_dir)
        logger.info("World built in %.0f s: %s", time.perf_counter() - started, json.dumps(world.judge_notes))
        judges = world.judge_notes
    if args.features_only:
        return 0
    result = {
        "title": "Many users, few comparisons each",
        "command": command_line("benchmarks.studies.population", argv),
        "preset": {**vars(preset)},
        "judges": judges,
        "merged_from": sorted(set(merged_commands)),
    }
    with tempfile.TemporaryDirectory(prefix="population-stores-") as workdir:
        for seed in preset.seeds:  # every alpha of a seed before the next seed: a partial run covers both alphas
            for alpha in preset.alphas:
                key = str(float(alpha))
                if str(seed) in runs.get(key, {}):
                    logger.info("alpha %s seed %d: already run", key, seed)
                    continue
                begun = time.perf_counter()
                run = run_seed(world, model, tokenizer, preset, alpha, seed, Path(workdir))
                logger.info("alpha %s seed %d: %.0f s; seen %s", key, seed, time.perf_counter() - begun,
                            json.dumps({k: round(v, 4) for k, v in run["seen"].items()}))  # fmt: skip
                runs.setdefault(key, {})[str(seed)] = run
                result["sizes"] = run["sizes"]
                json_path.write_text(json.dumps({**result, "runs": runs}, indent=1))
    wanted = {str(float(alpha)) for alpha in preset.alphas}
    runs = {alpha: {seed: runs[alpha][seed] for seed in sorted(runs[alpha]) if int(seed) in preset.seeds}
            for alpha in sorted(runs, key=float) if alpha in wanted}  # fmt: skip
    result["sizes"] = next(iter(next(iter(runs.values())).values()))["sizes"]
    result["runs"] = runs
    result["summary"] = summarize(runs)
    result["goals"] = goals(result["summary"], preset)
    json_path.write_text(json.dumps(result, indent=1))
    output.write_text(render(result), encoding="utf-8")
    plot(result, output.with_suffix(".png"))
    print(output.read_text())
    return 0


def convert_counts(run: dict) -> dict:
    """A run read back from JSON: budget keys become ints again."""
    run["unseen"] = {
        name: {int(count): value for count, value in values.items()} for name, values in run["unseen"].items()
    }
    run["per_new_user_ms"] = {
        name: {int(count): value for count, value in values.items()} for name, values in run["per_new_user_ms"].items()
    }
    return run


if __name__ == "__main__":
    sys.exit(main())
