"""
Best-of-n personalization benchmark: what does each reward do to behaviour when it reranks a model's candidates per
reader, where RL at a budget that leaves every taste room cannot run?

The embedded SmolLM2-135M-Instruct answers each held-out prompt `--pool_size` times, once, without any reader's
message, at a budget of `--max_new_tokens` tokens; every reader shares these candidates, so any difference between
readers' picks comes from the reward. Each reward then picks the best of n candidates per prompt and reader through
`MiCRoReward.rerank` (`trl_micro.reranking`: one backbone pass per candidate, whatever the number of readers), and the
reader's gold reward judges the pick against a random candidate of the same prompt. The readers, the gold rewards and
the held-out prompts are the RL benchmark's (`benchmarks/rl/personalization_rewards.py`,
`benchmarks/rl/rl_personalization.py`): DSP's four domains and the two synthetic tastes (short and casual, long and
formal).

Rewards, each over the frozen SmolLM2 backbone and reading the bare prompt (only heads and routing differ per reader):

    micro           MiCRo's K heads routed per reader by Stage 2 online routing fitted on `--adaptation_pairs` labelled
                    pairs of that reader
    micro_residual  the same, plus the reader's residual head (fitted on the same pairs)
    single          SingleReward (one Bradley-Terry head): the same pick for every reader
    single_residual SingleReward plus the reader's residual head
    gold            the reader's own gold head (reading the reader's message as the system message): the ceiling

Best of n for n < pool size is averaged exactly over every n-subset of the pool (`pick_probabilities`), and the win
rate over a random candidate counts ties as half. MiCRo and SingleReward train with 3 seeds (`--seeds`: heads'
initialization, training and the adaptation draw); the gold heads and the candidates are drawn once.

    python -m benchmarks.rl.best_of_n --preset smoke --cache_dir /tmp/bon-smoke   # tiny random models, seconds
    python -m benchmarks.rl.best_of_n --threads 1 --cache_dir ~/.cache/trl_micro/best-of-n \
        --data_dir ../shared/data                                                  # results/best_of_n.md

Everything slow is cached under `--cache_dir` and reused by the next run (the command is resumable): the candidates
(one JSON file per prompt, named by the sampling settings), the reward models' heads and Stage 2 state (one file per
scenario, reward and seed) and the backbone's readings of every sequence (`trl_micro.feature_cache.FeatureStore`).
`--stage sample` only samples candidates, `--stage rewards` only trains and caches the reward models; `--partial`
reports on the prompts whose candidates are sampled so far (the report says how many).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from benchmarks import command_line, default_data_dir
from benchmarks.rl.best_of_n_report import write_report
from benchmarks.rl.personalization_rewards import (
    DSPRewardSetup,
    RewardSetup,
    draw_dsp_pools,
    draw_pools,
    train_heads,
)
from benchmarks.rl.policy_inputs import dsp_prompts, load_models, prompt_splits
from trl_micro import MiCRoRewardModel, adapt_to_users
from trl_micro.bundled.dsp import DOMAINS
from trl_micro.data_utils import completion_end_token_ids
from trl_micro.personalization.online_router import OnlineRouter
from trl_micro.personalization.residual_heads import ResidualHeads
from trl_micro.rewards import MiCRoReward
from trl_micro.scoring import score_preference_pairs
from trl_micro.scripts.rl_utils import sample_completions

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("synthetic", "dsp")
METHODS = ("micro", "micro_residual", "single", "single_residual", "gold")

PRESETS = {
    # Tiny random policy and reward backbone: a test of the pipeline, not a result.
    "smoke": dict(
        models="tiny",
        scenarios=["synthetic"],
        seeds=[0, 1],
        ns=[1, 2, 4],
        pool_size=4,
        max_new_tokens=8,
        eval_prompts=3,
        stage1_pairs=24,
        adaptation_pairs=4,
        gold_pairs=24,
        test_pairs=8,
        reward_epochs=3,
        stage1_queries=6,
        adaptation_queries=4,
        gold_queries=6,
        test_queries=4,
        timing_candidates=4,
        timing_repeats=2,
        head_init="random",
    ),
    # The RL benchmark's readers, gold rewards and held-out prompts (16 per scenario), at a budget of 512 tokens.
    "full": dict(
        models="embedded",
        scenarios=list(SCENARIOS),
        seeds=[0, 1, 2],
        ns=[1, 2, 4, 8, 16],
        pool_size=16,
        max_new_tokens=512,
        eval_prompts=16,
        stage1_pairs=200,
        adaptation_pairs=32,
        gold_pairs=400,
        test_pairs=100,
        reward_epochs=30,
        stage1_queries=300,
        adaptation_queries=40,
        gold_queries=200,
        test_queries=100,
        timing_candidates=8,
        timing_repeats=2,
        head_init=None,
    ),
}
SAMPLING = dict(temperature=1.0, top_p=1.0, top_k=0)  # the RL benchmark's evaluation sampling


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="full", help="Defaults of every setting below.")
    parser.add_argument("--models", choices=["embedded", "tiny"], help="SmolLM2-135M, or tiny random models.")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, help="Synthetic tastes and/or DSP's readers.")
    parser.add_argument("--seeds", nargs="+", type=int, help="Seeds of MiCRo's and SingleReward's training.")
    parser.add_argument("--ns", nargs="+", type=int, help="The n of best-of-n (each at most --pool_size).")
    parser.add_argument("--pool_size", type=int, help="Candidates sampled per prompt (shared by every reader).")
    parser.add_argument("--max_new_tokens", type=int, help="Token budget of each candidate.")
    parser.add_argument("--eval_prompts", type=int, help="Held-out prompts per scenario (the RL benchmark's first).")
    parser.add_argument("--stage1_pairs", type=int, help="Synthetic: Stage 1 pairs per context.")
    parser.add_argument("--adaptation_pairs", type=int, help="Labelled pairs per reader for Stage 2.")
    parser.add_argument("--gold_pairs", type=int, help="Synthetic: pairs per context the gold heads train on.")
    parser.add_argument("--test_pairs", type=int, help="Synthetic: test pairs per context (split sizes only).")
    parser.add_argument("--reward_epochs", type=int, help="Synthetic: training epochs of every reward head.")
    parser.add_argument("--stage1_queries", type=int, help="DSP: queries of the Stage 1 pairs.")
    parser.add_argument("--adaptation_queries", type=int, help="DSP: queries the Stage 2 pairs are drawn from.")
    parser.add_argument("--gold_queries", type=int, help="DSP: queries of each domain's gold pairs.")
    parser.add_argument("--test_queries", type=int, help="DSP: queries of the held-out prompts.")
    # Parts of the pools (the split, and so the held-out prompts and the other pools, unchanged): for a machine too
    # busy to read every pair of the RL benchmark's pools in time.
    parser.add_argument("--stage1_used", type=int, help="Synthetic: Stage 1 on the first this many pairs per taste.")
    parser.add_argument(
        "--gold_used", type=int, help="Synthetic: the gold heads on the first this many pairs per taste."
    )
    parser.add_argument("--stage1_queries_used", type=int, help="DSP: Stage 1 on the first this many Stage 1 queries.")
    parser.add_argument(
        "--gold_queries_used", type=int, help="DSP: the gold heads on the first this many gold queries."
    )
    parser.add_argument("--timing_candidates", type=int, help="Candidates reranked in the 1-user / 4-user timing.")
    parser.add_argument("--timing_repeats", type=int, help="Repeats of each timing (the median is reported).")
    parser.add_argument("--head_init", default=None, help="Stage 1 head initialization (default: the library's).")
    parser.add_argument("--sampling_seed", type=int, default=0, help="Seed of the candidates' sampling.")
    parser.add_argument("--data_dir", default=default_data_dir(), help="Real data folder (DSP).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--cache_dir", required=True, help="Candidates, reward models and backbone features.")
    parser.add_argument("--output_dir", default=str(RESULTS), help="Where best_of_n.{md,json} and the plot go.")
    parser.add_argument(
        "--stage",
        choices=["all", "sample", "rewards", "features"],
        default="all",
        help="`sample`: only sample candidates; `rewards`: only train and cache the reward models; `features`: "
        "also read the candidates into the feature store; `all`: the lot and the report.",
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="Report on the prompts whose candidates are sampled so far instead of sampling the rest.",
    )
    preset = parser.parse_known_args(argv)[0].preset
    parser.set_defaults(preset=preset, **PRESETS[preset])
    args = parser.parse_args(argv)
    for name in ("pool_size", "max_new_tokens", "eval_prompts", "adaptation_pairs", "timing_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if any(n < 1 or n > args.pool_size for n in args.ns):
        parser.error(f"every --ns must be between 1 and --pool_size={args.pool_size}, got {args.ns}.")
    args.num_contexts = 2  # the synthetic tastes (load_models reads it)
    return args


# -------------------------------------------------------------------------------------------------- prompts
def dsp_setup(args, seed: int = 0) -> DSPRewardSetup:
    """The RL benchmark's DSP sizes over all four domains; `seed` 0 is its query split (and the held-out prompts)."""
    return DSPRewardSetup.from_args(args, DOMAINS, seed)


def held_out_prompts(args, scenario: str) -> tuple[list, dict[str, str]]:
    """(the held-out queries, bare conversational prompts, in order; {reader id: the reader's message})."""
    if scenario == "dsp":
        _, evaluation = dsp_prompts(draw_dsp_pools(dsp_setup(args), args.data_dir), args.eval_prompts)
    else:
        _, evaluation = prompt_splits(args.num_contexts, args.eval_prompts)
    queries = list({json.dumps(query): query for query in evaluation["query"]}.values())
    readers = dict(zip(evaluation["context_id"], evaluation["context"]))
    return queries, dict(sorted(readers.items()))


# ----------------------------------------------------------------------------------------------- candidates
def sampling_settings(args) -> dict:
    return {
        "models": args.models,
        "pool_size": args.pool_size,
        "max_new_tokens": args.max_new_tokens,
        "sampling_seed": args.sampling_seed,
        **SAMPLING,
    }


def candidates_dir(args, scenario: str) -> Path:
    digest = hashlib.sha256(json.dumps(sampling_settings(args), sort_keys=True).encode()).hexdigest()[:10]
    return Path(args.cache_dir) / "candidates" / f"{scenario}-{args.models}-{digest}"


def candidate_file(args, scenario: str, index: int) -> Path:
    return candidates_dir(args, scenario) / f"prompt-{index:03d}.json"


def load_candidates(args, scenario: str, index: int, query) -> dict | None:
    """The cached candidates of prompt `index`, or None (not sampled, or sampled for another prompt)."""
    path = candidate_file(args, scenario, index)
    if not path.exists():
        return None
    cached = json.loads(path.read_text())
    if cached["query"] != query or cached["settings"] != sampling_settings(args):
        return None
    return cached


def sample_prompt(args, policy, tokenizer, scenario: str, index: int, query) -> dict:
    """`--pool_size` candidates for one prompt (no reader's message), seeded by the prompt, written to the cache."""
    torch.manual_seed(args.sampling_seed * 100_003 + index * 2 + SCENARIOS.index(scenario))
    started = time.perf_counter()
    texts, tokens, capped = sample_completions(
        policy,
        tokenizer,
        [query] * args.pool_size,
        args.max_new_tokens,
        args.pool_size,
        return_lengths=True,
        **SAMPLING,
    )
    sampled = {
        "query": query,
        "settings": sampling_settings(args),
        "candidates": [completion[0]["content"] for completion in texts],
        "tokens": tokens,
        "capped": capped,
        "seconds": time.perf_counter() - started,
    }
    path = candidate_file(args, scenario, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(sampled) + "\n")
    os.replace(temporary, path)  # a file is complete or absent: an interrupted run resumes at the next prompt
    return sampled


def sample_candidates(args, prompts: dict[str, list], policy_path: str, tokenizer) -> dict[str, list[dict]]:
    """
    Every scenario's candidates, from the cache or sampled now, the scenarios' prompts interleaved (so that a run cut
    short has about as many prompts of each). With `--partial`, only the cached ones (in order, up to the first gap).
    """
    found = {scenario: [] for scenario in prompts}
    missing = [
        (index, scenario)
        for index in range(max(len(queries) for queries in prompts.values()))
        for scenario, queries in prompts.items()
        if index < len(queries)
    ]
    policy = None
    for index, scenario in missing:
        query = prompts[scenario][index]
        cached = load_candidates(args, scenario, index, query)
        if cached is None and args.partial:
            continue
        if cached is None:
            if policy is None:
                policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
            cached = sample_prompt(args, policy, tokenizer, scenario, index, query)
            print(
                f"sampled {scenario} prompt {index}: {cached['seconds']:.0f} s, "
                f"{sum(cached['capped'])}/{len(cached['capped'])} cut at {args.max_new_tokens} tokens",
                flush=True,
            )
        if len(found[scenario]) == index:  # --partial: keep a prefix of the prompts
            found[scenario].append(cached)
    return found


# -------------------------------------------------------------------------------------------------- rewards
TRAINED_CONFIG = ("prompt_marker", "prompt_marker_ids", "completion_end_ids")  # what the Stage 1 trainer sets


@dataclass(frozen=True)
class HeadInitSetup(RewardSetup):
    """`RewardSetup` whose heads start as `head_init` says (the smoke preset: at random, which takes no time)."""

    head_init: str = "em"

    def training(self) -> dict:
        return {**super().training(), "head_init": self.head_init}


@dataclass(frozen=True)
class DSPHeadInitSetup(DSPRewardSetup):
    head_init: str = "em"

    def training(self) -> dict:
        return {**super().training(), "head_init": self.head_init}


def reward_setup(args, scenario: str, seed: int) -> RewardSetup | DSPRewardSetup:
    if scenario == "dsp":
        setup = dsp_setup(args, seed)
        return setup if args.head_init is None else DSPHeadInitSetup(**vars(setup), head_init=args.head_init)
    setup = RewardSetup.from_args(args, seed)
    return setup if args.head_init is None else HeadInitSetup(**vars(setup), head_init=args.head_init)


def rewards_dir(args, scenario: str) -> Path:
    settings = {
        name: getattr(args, name)
        for name in (
            "models",
            "stage1_pairs",
            "adaptation_pairs",
            "gold_pairs",
            "test_pairs",
            "reward_epochs",
        )
    }
    if args.head_init is not None:
        settings["head_init"] = args.head_init
    if scenario == "synthetic":
        settings.update({name: value for name, value in used_parts(args, scenario).items() if value is not None})
    if scenario == "dsp":
        names = ("stage1_queries", "adaptation_queries", "gold_queries", "test_queries")
        settings.update({name: getattr(args, name) for name in names}, **used_parts(args, scenario))
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(args.cache_dir) / "rewards" / f"{scenario}-{args.models}-{digest}"


def save_heads(model: MiCRoRewardModel, path: Path) -> None:
    """The heads and router of `model` (not its backbone) and the config fields training set, beside each other."""
    prefix = f"{model.base_model_prefix}."
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if not name.startswith(prefix)}
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {name: getattr(model.config, name) for name in TRAINED_CONFIG}
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({"num_heads": model.num_heads, "config": config}) + "\n")


def load_heads(backbone, path: Path) -> MiCRoRewardModel | None:
    if not (path.with_suffix(".json").exists() and path.with_suffix(".safetensors").exists()):
        return None
    saved = json.loads(path.with_suffix(".json").read_text())
    model = MiCRoRewardModel.from_backbone(backbone, num_heads=saved["num_heads"])
    for name, value in saved["config"].items():
        setattr(model.config, name, value)
    missing, unexpected = model.load_state_dict(load_file(str(path.with_suffix(".safetensors"))), strict=False)
    prefix = f"{model.base_model_prefix}."
    if unexpected or any(not name.startswith(prefix) for name in missing):
        raise ValueError(f"{path}: cached heads do not fit the model (missing {missing}, unexpected {unexpected}).")
    model.heads_untrained = False
    return model.eval()


def cached_heads(backbone, tokenizer, pairs, num_heads, setup, args, path: Path) -> MiCRoRewardModel:
    model = load_heads(backbone, path)
    if model is None:
        started = time.perf_counter()
        model = train_heads(backbone, tokenizer, pairs(), num_heads, setup, features_dir(args))
        save_heads(model, path)
        print(f"trained {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return model


def features_dir(args) -> str:
    return str(Path(args.cache_dir) / "features")


def cached_adaptation(model, tokenizer, adaptation, args, folder: Path, routing: bool):
    """
    (online router or None, residual heads) of every reader, fitted on its labelled pairs (`adaptation()`) read
    without their context, as the rewards read the candidates: the reader is an id, not text.
    """
    router_path, residual_path = folder / "online_router.json", folder / "residual_heads.json"
    if not residual_path.exists():
        pairs = adaptation()
        scores = score_preference_pairs(
            model, pairs.remove_columns("context"), tokenizer, feature_cache_dir=features_dir(args)
        )
        adapted = adapt_to_users(pairs["context_id"], scores)
        folder.mkdir(parents=True, exist_ok=True)
        adapted.online_router.save(router_path)
        adapted.residual_heads.save(residual_path)
    router = OnlineRouter.load(router_path, expected_num_heads=model.num_heads) if routing else None
    residuals = ResidualHeads.load(residual_path, expected_hidden_size=model.config.reward_feature_size)
    return router, residuals


def used_parts(args, scenario: str) -> dict:
    """How much of the Stage 1 and gold pools trains the rewards: `{stage1_used, gold_used}` (None: all)."""
    if scenario == "dsp":
        return {"stage1_used": args.stage1_queries_used, "gold_used": args.gold_queries_used}
    return {"stage1_used": args.stage1_used, "gold_used": args.gold_used}


def first_part(pairs, used: int, key: str):
    """DSP (`key="query_id"`): the pairs of the first `used` queries; synthetic (`"context_id"`): the first `used`
    pairs of each context."""
    if key == "query_id":
        kept = set(list(dict.fromkeys(pairs["query_id"]))[:used])
        return pairs.filter(lambda row: row["query_id"] in kept)
    seen, rows = {}, []
    for index, context in enumerate(pairs["context_id"]):
        seen[context] = seen.get(context, 0) + 1
        if seen[context] <= used:
            rows.append(index)
    return pairs.select(rows)


def build_rewards(args, scenario: str, backbone, tokenizer, readers: dict[str, str]) -> dict:
    """
    `{"gold": {reader: MiCRoReward}, seed: {method: MiCRoReward}}` of one scenario, trained or read from the cache.
    Every seed trains on the RL benchmark's pools (its split, seed 0); the seed changes the heads' initialization and
    training. The gold heads are the RL benchmark's (seed 0), one per reader.
    """
    split = reward_setup(args, scenario, 0)
    pools = {}

    def pool(name):
        if not pools:
            pools.update(draw_dsp_pools(split, args.data_dir) if scenario == "dsp" else draw_pools(split))
            # A part of the pools, the split (and so the held-out prompts and the other pools) unchanged: on DSP the
            # pairs of the first `used` queries, on the synthetic scenario the first `used` pairs of each taste.
            used = used_parts(args, scenario)
            for part in ("stage1", "gold"):
                if used[f"{part}_used"] is not None:
                    key = "query_id" if scenario == "dsp" else "context_id"
                    pools[part] = first_part(pools[part], used[f"{part}_used"], key)
        return pools[name]

    folder = rewards_dir(args, scenario)
    rewards = {"gold": {}}
    for reader in readers:

        def own(reader=reader):  # the reader's gold pairs, shown without the reader's message (module docstring)
            return pool("gold").filter(lambda row: row["context_id"] == reader).remove_columns("context")

        judge = cached_heads(backbone, tokenizer, own, 1, split, args, folder / f"gold-{reader}")
        rewards["gold"][reader] = MiCRoReward(judge, tokenizer, name=f"gold_{reader}")
    for seed in args.seeds:
        setup = reward_setup(args, scenario, seed)
        found = {}
        for method, num_heads in (("micro", split.num_heads), ("single", 1)):
            model = cached_heads(
                backbone, tokenizer, lambda: pool("stage1"), num_heads, setup, args, folder / f"{method}-seed{seed}"
            )
            users = folder / f"{method}-seed{seed}-users"
            router, residuals = cached_adaptation(
                model, tokenizer, lambda: pool("adaptation"), args, users, routing=method == "micro"
            )
            routed = {"user_column": "context_id", "online_router": router} if router is not None else {}
            found[method] = MiCRoReward(model, tokenizer, name=method, **routed)
            found[f"{method}_residual"] = MiCRoReward(
                model,
                tokenizer,
                user_column="context_id",
                online_router=router,
                residual_heads=residuals,
                name=f"{method}_residual",
            )
        rewards[seed] = found
    return rewards


# -------------------------------------------------------------------------------------------------- scoring
def candidate_completions(sampled: list[dict]) -> list[list]:
    return [[[{"role": "assistant", "content": text}] for text in prompt["candidates"]] for prompt in sampled]


def read_candidates(args, rewards: dict, prompts: dict, sampled: dict) -> None:
    """
    The backbone's readings of every candidate, into the feature store one prompt at a time (so that a stopped run
    keeps what it read): all the rewards read the same sequences (the bare prompt and the candidate).
    """
    for scenario, found in sampled.items():
        reward = next(iter(rewards[scenario]["gold"].values()))
        for index, (query, completions) in enumerate(zip(prompts[scenario], candidate_completions(found))):
            started = time.perf_counter()
            reward.rerank([query], [completions], feature_store=features_dir(args))
            seconds = time.perf_counter() - started
            if seconds > 5:
                print(f"read {scenario} prompt {index}'s candidates in {seconds:.0f} s", flush=True)


def score_scenario(args, rewards: dict, queries: list, sampled: list[dict], readers: list[str]) -> dict:
    """
    Every candidate's score under every reward, `(prompts, readers, pool)` tensors: `gold` (each reader's gold) and,
    per seed, each method's score for each reader (`MiCRoReward.rerank`, readers as user ids; SingleReward routes no
    one, so its score is the same for every reader).
    """
    completions = candidate_completions(sampled)
    queries = queries[: len(sampled)]
    store = features_dir(args)

    def stacked(ranking) -> torch.Tensor:
        return torch.stack(ranking.scores)  # (prompts, users, pool)

    gold = torch.cat(
        [stacked(judge.rerank(queries, completions, feature_store=store)) for judge in rewards["gold"].values()], dim=1
    )
    scores = {"gold": gold}
    for seed in args.seeds:
        for method, reward in rewards[seed].items():
            if reward.online_router is None and reward.residual_heads is None:
                users = [[None]] * len(queries)
            else:
                users = [list(readers)] * len(queries)
            score = stacked(reward.rerank(queries, completions, users=users, feature_store=store))
            scores[(method, seed)] = score.expand(-1, len(readers), -1)
    return scores


def pick_probabilities(scores: torch.Tensor, n: int) -> torch.Tensor:
    """
    `(..., pool)`: the probability that best-of-n picks each candidate, over the n-subsets of the pool drawn uniformly
    (exact): the candidate ranked j-th (0 = best; ties go to the lower index, as `argmax` breaks them) is the pick
    when it is drawn and none of the j above it is, C(pool - 1 - j, n - 1) / C(pool, n).
    """
    pool = scores.shape[-1]
    ranks = torch.argsort(torch.argsort(-scores, dim=-1, stable=True), dim=-1)
    weight = torch.tensor(
        [math.comb(pool - 1 - j, n - 1) / math.comb(pool, n) for j in range(pool)], dtype=torch.float64
    )
    return weight[ranks]


def win_over_random(gold: torch.Tensor) -> torch.Tensor:
    """`(..., pool)`: each candidate's win rate under `gold` against a random candidate of its pool (ties 1/2, itself
    included)."""
    gold = gold.double()
    below = (gold.unsqueeze(-1) > gold.unsqueeze(-2)).double().sum(-1)
    ties = (gold.unsqueeze(-1) == gold.unsqueeze(-2)).double().sum(-1)
    return (below + 0.5 * ties) / gold.shape[-1]


def summarize_scenario(args, scores: dict, sampled: list[dict], readers: list[str]) -> dict:
    """Win rates against n, the cross-reader matrix and the picks' lengths, per method (mean and std over seeds)."""
    tokens = torch.tensor([prompt["tokens"] for prompt in sampled], dtype=torch.float64)  # (prompts, pool)
    wins = win_over_random(scores["gold"])  # (prompts, readers, pool): judged by each reader's gold
    n_max = max(args.ns)
    methods = {"gold": [scores["gold"]]}
    for key, value in scores.items():
        if key != "gold":
            methods.setdefault(key[0], []).append(value)
    summary = {}
    for method, per_seed in methods.items():
        curves, matrices, lengths = [], [], []
        for score in per_seed:
            curves.append(
                torch.stack([(pick_probabilities(score, n) * wins).sum(-1).mean(0) for n in args.ns])
            )  # (ns, readers)
            probabilities = pick_probabilities(score, n_max)  # (prompts, readers, pool)
            # picks made for reader a judged by reader b's gold: (a, b)
            matrices.append(torch.einsum("pak,pbk->ab", probabilities, wins) / len(sampled))
            lengths.append((probabilities * tokens.unsqueeze(1)).sum(-1).mean(0))
        curves, matrices, lengths = torch.stack(curves), torch.stack(matrices), torch.stack(lengths)
        summary[method] = {
            "seeds": len(per_seed),
            "win_rate": {
                reader: {str(n): stats(curves[:, position, index]) for position, n in enumerate(args.ns)}
                for index, reader in enumerate(readers)
            },
            "cross_reader": {
                reader: {judge: stats(matrices[:, a, b]) for b, judge in enumerate(readers)}
                for a, reader in enumerate(readers)
            },
            "pick_tokens": {reader: stats(lengths[:, index]) for index, reader in enumerate(readers)},
        }
    gold = scores["gold"].double()
    standardized = (gold - gold.mean(-1, keepdim=True)) / gold.std(-1, keepdim=True).clamp_min(1e-9)
    taste = {}
    for index, reader in enumerate(readers):
        others = torch.cat([standardized[:, :index], standardized[:, index + 1 :]], dim=1).mean(1)
        own = standardized[:, index]
        taste[reader] = float(torch.corrcoef(torch.stack([own.flatten(), others.flatten()]))[0, 1])
    return {
        "readers": readers,
        "prompts": len(sampled),
        "pool_size": args.pool_size,
        "pool_tokens": stats(tokens.flatten()),
        "cut_share": float(
            torch.tensor([c for prompt in sampled for c in prompt["capped"]], dtype=torch.float64).mean()
        ),
        "sampling_seconds": sum(prompt["seconds"] for prompt in sampled),
        "taste_correlation": taste,
        "methods": summary,
    }


def stats(values: torch.Tensor) -> dict:
    values = values.double().flatten()
    std = float(values.std()) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "n": len(values)}


def time_reranking(args, rewards: dict, queries: list, sampled: list[dict], readers: list[str]) -> dict:
    """
    Seconds to rerank `--timing_candidates` candidates of the first prompt for 1 user and for 4 users (MiCRo, first
    seed; the backbone runs every time: no feature store), alternated `--timing_repeats` times; min and median.
    """
    reward = rewards[args.seeds[0]]["micro_residual"]
    completions = candidate_completions(sampled[:1])[0][: args.timing_candidates]
    users = (list(readers) + [f"new-user-{k}" for k in range(4)])[:4]  # a user the state lacks: routed by the router
    reward.rerank(queries[:1], [completions[:1]], users=[users])  # warm-up, untimed
    times = {"1 user": [], "4 users": []}
    for _ in range(args.timing_repeats):
        for label, group in (("1 user", users[:1]), ("4 users", users)):
            started = time.perf_counter()
            reward.rerank(queries[:1], [completions], users=[group])
            times[label].append(time.perf_counter() - started)
    result = {
        label: {"min": min(values), "median": float(torch.tensor(values).median()), "all": values}
        for label, values in times.items()
    }
    result["candidates"] = len(completions)
    result["users"] = users
    result["ratio_min"] = result["4 users"]["min"] / result["1 user"]["min"]
    result["ratio_median"] = result["4 users"]["median"] / result["1 user"]["median"]
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    command = command_line("benchmarks.rl.best_of_n", argv if argv is not None else sys.argv[1:])
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    policy_path, tokenizer, backbone, reward_tokenizer = load_models(args, args.cache_dir)
    prompts, readers = {}, {}
    for scenario in args.scenarios:
        prompts[scenario], readers[scenario] = held_out_prompts(args, scenario)
    if args.stage == "sample":
        sample_candidates(args, prompts, policy_path, tokenizer)
        return
    if args.stage == "features":  # the sampled candidates into the feature store, before any reward is trained
        reader = MiCRoReward(MiCRoRewardModel.from_backbone(backbone, num_heads=1), reward_tokenizer)
        reader.model.config.completion_end_ids = completion_end_token_ids(reward_tokenizer, True)  # as trained
        sampled = sample_candidates(args, prompts, policy_path, tokenizer)
        read_candidates(args, {scenario: {"gold": {"any": reader}} for scenario in sampled}, prompts, sampled)
        return
    rewards = {}
    for scenario in args.scenarios:
        rewards[scenario] = build_rewards(args, scenario, backbone, reward_tokenizer, readers[scenario])
    if args.stage == "rewards":
        return
    sampled = sample_candidates(args, prompts, policy_path, tokenizer)
    read_candidates(args, rewards, prompts, sampled)
    scenarios = {}
    timing = None
    for scenario in args.scenarios:
        if not sampled[scenario]:
            print(f"{scenario}: no prompt sampled yet; left out of the report", flush=True)
            continue
        names = list(readers[scenario])
        scores = score_scenario(args, rewards[scenario], prompts[scenario], sampled[scenario], names)
        scenarios[scenario] = summarize_scenario(args, scores, sampled[scenario], names)
        scenarios[scenario]["held_out_prompts"] = len(prompts[scenario])
        if timing is None:
            timing = time_reranking(args, rewards[scenario], prompts[scenario], sampled[scenario], names)
    if not scenarios:
        raise SystemExit("No candidates sampled yet: nothing to report.")
    results = {
        "title": "Personalized best-of-n: each reward's pick among shared candidates, judged by each reader's gold",
        "command": command,
        "settings": {  # the folders are in the command, as typed
            key: value for key, value in vars(args).items() if key not in ("output_dir", "cache_dir", "data_dir")
        },
        "partial": args.partial,
        "scenarios": scenarios,
        "timing": timing,
        "seconds": time.perf_counter() - started,
    }
    markdown = write_report(results, Path(args.output_dir))
    print(markdown.read_text())


if __name__ == "__main__":
    main()
