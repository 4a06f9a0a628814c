"""
The rewards of the RL personalization benchmark (`benchmarks/rl/rl_personalization.py`), all over one frozen backbone:

- MiCRo: K heads + router trained on Stage 1 pairs without their contexts, whose rater follows the prompt's topic
  (`trl_micro.bundled.synthetic.rated_by_topic_owner`, as in the benchmark's synthetic pools), then Stage 2 state per
  context id (`adapt_to_users`: an online router and residual heads) fitted on `adaptation_pairs` labelled pairs
  per context that mix every topic, scored by the Stage 1 model: what a user with a few labelled pairs has.
- SingleReward: one Bradley-Terry head on the same Stage 1 pairs.
- Gold: per context, an oracle Bradley-Terry head trained with the context labels on a larger pool that no other
  reward saw, standing in for the context's true taste ([`GoldReward`] scores each row with its own context's head).

The pools are conversational synthetic pairs (the context as the system message, as the policy's prompts show it):
Stage 1 from one generator draw, the adaptation, gold and test pools from another, split per context. The test pairs
measure how well each reward ranks pairs of every context.

On DSP ([`draw_dsp_pools`]) the same three rewards come from disjoint sets of DSP queries: Stage 1 on every domain's
pairs of the Stage 1 queries without their context (K = 4 heads, one per domain at best); Stage 2 from
`adaptation_pairs` labelled pairs per domain of other queries; each domain's gold head on the pairs of yet other
queries; the test pairs from the rest, whose queries are also the policy's held-out prompts. Heads train with the
library's defaults there (`MiCRoRewardConfig`), as a user of `--freeze_backbone` gets them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from trl_micro import MiCRoRewardConfig, MiCRoRewardModel, MiCRoRewardTrainer, adapt_to_users
from trl_micro.bundled.dsp import DOMAINS, SEEN_WORDINGS, dsp_pairs, load_dsp_queries
from trl_micro.bundled.synthetic import SyntheticPreferenceConfig, generate_synthetic_preferences, rated_by_topic_owner
from trl_micro.evaluation import per_context_accuracy
from trl_micro.rewards import MiCRoReward
from trl_micro.scoring import score_preference_pairs
from trl_micro.splits import split_by_context, take_per_context

STAGE1_SEED, EVALUATION_SEED = 1, 2  # generator seeds of the Stage 1 draw and of the adaptation / gold / test draw
CPU_RUN = dict(report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, bf16=False)
"""Training arguments of every run of the benchmark (reward heads and GRPO): on the CPU, nothing saved or reported."""


def arguments(args, *names: str) -> dict:
    """{name: args.name} of the parsed arguments `names`."""
    return {name: getattr(args, name) for name in names}


@dataclass(frozen=True)
class RewardSetup:
    """
    Sizes and training of the benchmark's rewards.

    Args:
        num_contexts: M, the synthetic subpopulations (the first M; 2 = short and casual vs long and formal).
        num_heads: K of the MiCRo model.
        stage1_pairs: Stage 1 pairs per context (rated by the topic's owner; contexts not shown).
        adaptation_pairs: labelled pairs per context for Stage 2 (online router + residual heads).
        gold_pairs: pairs per context the gold heads train on.
        test_pairs: pairs per context on which every reward's accuracy is measured.
        epochs: training epochs of every head (on cached backbone features).
        learning_rate: AdamW learning rate of heads and router.
        seed: seed of the heads' initialization and of training.
    """

    num_contexts: int = 2
    num_heads: int = 2
    stage1_pairs: int = 200
    adaptation_pairs: int = 32
    gold_pairs: int = 400
    test_pairs: int = 100
    epochs: int = 30
    learning_rate: float = 5e-3
    seed: int = 0

    @classmethod
    def from_args(cls, args, seed: int = 0) -> RewardSetup:
        """The sizes a benchmark's arguments name (`--stage1_pairs` ...), K = M heads trained `--reward_epochs`."""
        sizes = arguments(args, "num_contexts", "stage1_pairs", "adaptation_pairs", "gold_pairs", "test_pairs")
        return cls(**sizes, num_heads=args.num_contexts, epochs=args.reward_epochs, seed=seed)

    def training(self) -> dict:
        """The `MiCRoRewardConfig` fields every head of this setup trains with (beyond the frozen-backbone run)."""
        return {"num_train_epochs": self.epochs, "learning_rate": self.learning_rate, "per_device_train_batch_size": 32}


@dataclass(frozen=True)
class DSPRewardSetup:
    """
    Sizes of the DSP scenario's rewards, in DSP queries (each gives 4 pairs per domain); heads train with the library's
    defaults.

    Args:
        domains: the readers the policy serves (Stage 2, gold, prompts); Stage 1 sees every domain's pairs.
        num_heads: K of the MiCRo model.
        stage1_queries: queries of the Stage 1 pairs (and of the policy's training prompts).
        adaptation_queries: queries the Stage 2 pairs are drawn from, `adaptation_pairs` per domain.
        adaptation_pairs: labelled pairs per domain for Stage 2 (online router + residual heads).
        gold_queries: queries of each domain's gold pairs.
        test_queries: queries of the test pairs and of the policy's held-out prompts (every other query at most).
        seed: seed of the query split, of the adaptation draw and of training.
    """

    domains: tuple[str, ...] = ("academy", "entertainment")
    num_heads: int = 4
    stage1_queries: int = 300
    adaptation_queries: int = 40
    adaptation_pairs: int = 32
    gold_queries: int = 200
    test_queries: int = 100
    seed: int = 0

    @classmethod
    def from_args(cls, args, domains, seed: int = 0) -> DSPRewardSetup:
        """The sizes a benchmark's arguments name (`--stage1_queries` ...) for the readers of `domains`."""
        names = ("stage1_queries", "adaptation_queries", "adaptation_pairs", "gold_queries", "test_queries")
        return cls(domains=tuple(domains), **arguments(args, *names), seed=seed)

    @property
    def num_contexts(self) -> int:
        return len(self.domains)

    def training(self) -> dict:
        return {}


def draw_pools(setup: RewardSetup) -> dict[str, Dataset]:
    """`stage1` (no `context` column), `adaptation`, `gold` and `test` pairs, conversational (module docstring)."""

    def draw(pairs_per_context: int, seed: int) -> Dataset:
        config = SyntheticPreferenceConfig(
            num_subpopulations=setup.num_contexts,
            num_pairs_per_subpopulation=pairs_per_context,
            conversational=True,
            seed=seed,
        )
        return generate_synthetic_preferences(config)

    # A subpopulation owns about 1/M of the topics: draw enough candidates for `stage1_pairs` of its own.
    owned = rated_by_topic_owner(draw(2 * setup.num_contexts * setup.stage1_pairs, STAGE1_SEED), setup.num_contexts)
    stage1 = take_per_context(owned, setup.stage1_pairs, seed=setup.seed).remove_columns("context")
    sizes = (setup.gold_pairs, setup.adaptation_pairs, setup.test_pairs)
    parts = split_by_context(draw(sum(sizes), EVALUATION_SEED), sizes_per_context=sizes, seed=setup.seed)
    return {"stage1": stage1, "adaptation": parts["adaptation"], "gold": parts["train"], "test": parts["test"]}


def draw_dsp_pools(setup: DSPRewardSetup, data_dir=None) -> dict[str, Dataset]:
    """
    `stage1` (every domain, no `context` column), `adaptation`, `gold` and `test` pairs of `setup.domains`, each pool
    from its own DSP queries (a seeded split), and `train_prompts` / `eval_prompts`: the Stage 1 and test queries
    under every domain of `setup.domains` (columns `prompt`, `query`, `context`, `context_id`; the context is the
    domain's first wording, shown to the policy).
    """
    unknown = sorted(set(setup.domains) - set(DOMAINS))
    if unknown or not setup.domains:
        raise ValueError(f"DSP domains must be some of {list(DOMAINS)}, got {list(setup.domains)}.")
    items = load_dsp_queries(data_dir)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(setup.seed)).tolist()
    sizes = (setup.stage1_queries, setup.adaptation_queries, setup.gold_queries)
    if sum(sizes) >= len(items):
        raise ValueError(
            f"DSP has {len(items)} queries; {sum(sizes)} go to Stage 1, adaptation and gold, none is left."
        )
    bounds = [sum(sizes[:index]) for index in range(4)]
    stage1_ids, adaptation_ids, gold_ids = (sorted(order[a:b]) for a, b in zip(bounds, bounds[1:]))
    test_ids = sorted(order[bounds[3] : bounds[3] + setup.test_queries])
    shown = {domain: (SEEN_WORDINGS[domain][0],) for domain in setup.domains}

    def prompts(query_ids):
        return Dataset.from_list(
            [
                {
                    "prompt": [{"role": "user", "content": items[i]["query"]}],
                    "query": [{"role": "user", "content": items[i]["query"]}],
                    "context": shown[domain][0],
                    "context_id": domain,
                }
                for i in query_ids
                for domain in setup.domains
            ]
        )

    adaptation = dsp_pairs(items, adaptation_ids, shown, setup.domains, seed=setup.seed)
    return {
        "stage1": dsp_pairs(items, stage1_ids, seed=setup.seed).remove_columns("context"),
        "adaptation": take_per_context(adaptation, setup.adaptation_pairs, seed=setup.seed),
        "gold": dsp_pairs(items, gold_ids, shown, setup.domains, seed=setup.seed),
        "test": dsp_pairs(items, test_ids, shown, setup.domains, seed=setup.seed),
        "train_prompts": prompts(stage1_ids),
        "eval_prompts": prompts(test_ids),
    }


def train_heads(
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset,
    num_heads: int,
    setup: RewardSetup | DSPRewardSetup,
    cache_dir: str,
) -> MiCRoRewardModel:
    """Heads (and router) over the shared frozen `backbone`, trained on `pairs` from its cached features."""
    set_seed(setup.seed)
    model = MiCRoRewardModel.from_backbone(backbone, num_heads=num_heads)
    config = MiCRoRewardConfig(
        output_dir=os.path.join(cache_dir, "runs"),
        num_heads=num_heads,
        freeze_backbone=True,
        feature_cache_dir=cache_dir,
        logging_steps=10_000,
        seed=setup.seed,
        **setup.training(),
        **CPU_RUN,
    )
    MiCRoRewardTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer).train()
    return model.eval()


class GoldReward:
    """
    A reward function for GRPOTrainer (and the benchmark's evaluation): each row's reward is its own context's gold
    head on the prompt + completion, the context read from `group_column` (a context id). In a trainer it logs the
    mean of each context as `gold/<context id>`.

    Args:
        judges (`dict[str, MiCRoReward]`): one single-head reward per context id.
        group_column (`str`, defaults to `"context_id"`): the dataset column of context ids.
    """

    __name__ = "gold"

    def __init__(self, judges: dict[str, MiCRoReward], group_column: str = "context_id"):
        self.judges = judges
        self.group_column = group_column

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        if self.group_column not in kwargs:
            raise ValueError(f"GoldReward reads the context id column {self.group_column!r}; the dataset lacks it.")
        groups = kwargs[self.group_column]
        rewards = self.score(prompts, completions, groups)
        if kwargs.get("log_metric") is not None:
            for group in sorted(set(groups)):
                kwargs["log_metric"](f"gold/{group}", rewards[[value == group for value in groups]].mean().item())
        return rewards.tolist()

    def score(self, prompts: list, completions: list, groups: list[str]) -> torch.Tensor:
        """(N,) gold rewards, one backbone pass per completion."""
        unknown = sorted(set(groups) - set(self.judges))
        if unknown:
            raise ValueError(f"No gold head for the context ids {unknown}; the gold knows {sorted(self.judges)}.")
        rewards = torch.zeros(len(prompts))
        for group, judge in self.judges.items():
            rows = [index for index, value in enumerate(groups) if value == group]
            if rows:
                scores = judge.score([prompts[i] for i in rows], [completions[i] for i in rows])
                rewards[rows] = scores["rewards"]
        return rewards


@dataclass
class BenchmarkRewards:
    """The three rewards GRPO trains against, and each one's per-context accuracy on the test pairs."""

    micro: MiCRoReward
    single: MiCRoReward
    gold: GoldReward
    accuracy: dict[str, dict]
    sizes: dict[str, int]


def build_rewards(
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    setup: RewardSetup | DSPRewardSetup,
    cache_dir: str,
    pools: dict[str, Dataset] | None = None,
) -> BenchmarkRewards:
    """
    Train MiCRo (+ Stage 2), SingleReward and the gold heads on `pools` (default: `draw_pools(setup)`; on DSP,
    `draw_dsp_pools`), and measure them on the test pairs.
    """
    pools = draw_pools(setup) if pools is None else pools
    test, test_contexts = pools["test"], pools["test"]["context_id"]

    def test_scores(model):
        return score_preference_pairs(model, test, tokenizer, feature_cache_dir=cache_dir)

    micro = train_heads(backbone, tokenizer, pools["stage1"], setup.num_heads, setup, cache_dir)
    adaptation_scores = score_preference_pairs(micro, pools["adaptation"], tokenizer, feature_cache_dir=cache_dir)
    adapted = adapt_to_users(pools["adaptation"]["context_id"], adaptation_scores)
    micro_test = test_scores(micro)
    single = train_heads(backbone, tokenizer, pools["stage1"], 1, setup, cache_dir)

    judges, gold_margins = {}, torch.zeros(len(test))
    for context_id in sorted(set(pools["gold"]["context_id"])):
        own = pools["gold"].filter(lambda row: row["context_id"] == context_id)
        judge = train_heads(backbone, tokenizer, own, 1, setup, cache_dir)
        judges[context_id] = MiCRoReward(judge, tokenizer, name=f"gold_{context_id}")
        rows = [index for index, value in enumerate(test_contexts) if value == context_id]
        gold_margins[rows] = test_scores(judge).margins[rows]

    accuracy = {
        "MiCRo, Stage 1 routing": per_context_accuracy(micro_test.margins, test_contexts),
        "MiCRo + Stage 2": per_context_accuracy(adapted.margins(micro_test, test_contexts), test_contexts),
        "SingleReward": per_context_accuracy(test_scores(single).margins, test_contexts),
        "gold": per_context_accuracy(gold_margins, test_contexts),
    }
    micro_reward = MiCRoReward(
        micro,
        tokenizer,
        user_column="context_id",
        online_router=adapted.online_router,
        residual_heads=adapted.residual_heads,
        name="micro",
    )
    return BenchmarkRewards(
        micro=micro_reward,
        single=MiCRoReward(single, tokenizer, name="single"),
        gold=GoldReward(judges),
        accuracy=accuracy,
        sizes={name: len(pool) for name, pool in pools.items() if not name.endswith("_prompts")},
    )
