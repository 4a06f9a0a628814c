r"""
MiCRo and the paper's baselines, trained and scored side by side on one pool of cached backbone features.

Every method trains through the library's trainers (`MiCRoRewardTrainer`, `RouterAdaptationTrainer`) with a frozen
backbone, reading the features of a [`CachedPairPool`] (pairs without their context, or with it in the prompt), so
all methods see the same pairs and the same backbone features and the backbone never runs again.

Notation: K heads r_k; for a pair i, delta_k,i = r_k(x_i, y_w,i) - r_k(x_i, y_l,i); A_c the adaptation pairs of
context c (a few labelled pairs); the context is never seen in Stage 1 (`train` pairs are scored without it).

    SingleReward          one Bradley-Terry head (K = 1)
    StaticMixture         K heads mixed by one learned weight vector (no router), mixture BT loss
    Shared-Base Ensemble  K heads, each with its own BT loss; the reward is their mean
    HyRe                  a diverse ensemble, reweighted per context from A_c:
                              w_c,k  ∝  exp( sum_{i in A_c} logsigmoid(delta_k,i) )
                          (an [`OnlineRouter`] with a uniform prior and eta = 1 computes exactly this); as in its
                          paper, each of its K members is one BT head trained on a bootstrap resample of the
                          training pairs from a random prior (its head starts at a fixed random vector, the same as a
                          trainable head added to a frozen random one), so the members disagree where the data leave
                          them free
    SingleReward + residual heads
                          per context c, a [`ResidualHeads`] correction on top of SingleReward, fitted on A_c: the
                          same per-context linear correction as below, without the mixture
    MiCRo Stage 1         K heads + a router reading the prompt, mixture BT loss; scored with the context in the
                          prompt, which its router never saw in training (zero-shot routing)
    MiCRo + router adaptation
                          the Stage-1 router fine-tuned on the adaptation pairs of every context at once, the context
                          in the prompt ([`RouterAdaptationTrainer`]); heads and backbone frozen
    MiCRo + online routing
                          per context c, an [`OnlineRouter`] posterior over the Stage-1 heads: its prior is the mean
                          Stage-1 router weight over A_c's prompts (context in the prompt), updated with A_c's head
                          margins; the context is known by its id, so heads score the pairs without it
    MiCRo + online routing + residual heads
                          online routing plus, per context, a [`ResidualHeads`] correction u_c . h(x, y) fitted on
                          A_c (the routed margins held fixed, lambda cross-validated on A_c): a context no mixture of
                          the heads matches can still move toward its own taste
    Oracle                one BT head per context, trained on that context's train pairs (an upper bound: it knows
                          every training pair's context)

On pools whose evaluation pairs also carry a held-out wording of their context, "MiCRo + router adaptation, unseen
context wordings" scores the adapted router on the test pairs worded that way. Stage 1 training (MiCRo, StaticMixture)
groups the pairs that share a prompt and a chosen response under one latent head (`latent_groups`, the library's
default), from the pool's texts.

Three diagnostics ride along: SingleReward scored with the context in the prompt (how much prepending a context moves
a context-blind model); the best Stage-1 head of each context chosen on the test pairs (the ceiling of any routing that
gives a context one head); and an oracle with MiCRo's architecture, K heads + router trained per context (the BT
oracle is linear in the features, while MiCRo's prompt-dependent routing is not, so MiCRo can beat the BT oracle).
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed
from transformers.trainer_callback import PrinterCallback

from benchmarks import stopwatch
from trl_micro.data_utils import context_indices
from trl_micro.evaluation import head_accuracy, head_usage, per_context_accuracy
from trl_micro.losses import head_agreement
from trl_micro.modeling_micro import MiCRoRewardModel
from trl_micro.personalization.adaptation import fit_online_router, fit_residual_heads, routed_margins, router_priors
from trl_micro.personalization.online_router import OnlineRouter
from trl_micro.personalization.residual_heads import ResidualHeads
from trl_micro.scoring import PairScores, score_pair_features
from trl_micro.splits import split_by_context, take_per_context
from trl_micro.trainer import MiCRoRewardConfig, MiCRoRewardTrainer, RouterAdaptationConfig, RouterAdaptationTrainer

from .metrics import best_head_accuracy
from .pair_pool import CachedPairPool

SINGLE = "SingleReward"
STATIC = "StaticMixture"
ENSEMBLE = "Shared-Base Ensemble"
HYRE = "HyRe (diverse ensemble reweighting)"
MICRO = "MiCRo Stage 1"
MICRO_ADAPTED = "MiCRo + router adaptation"
MICRO_ONLINE = "MiCRo + online routing"
MICRO_RESIDUAL = "MiCRo + online routing + residual heads"
SINGLE_RESIDUAL = "SingleReward + residual heads"
MICRO_ADAPTED_UNSEEN = "MiCRo + router adaptation, unseen context wordings"
ORACLE = "Oracle (BT per context)"
SINGLE_WITH_CONTEXT = "SingleReward, context in prompt (diagnostic)"
BEST_HEAD = "MiCRo best head per context, chosen on test (diagnostic)"
ORACLE_MICRO = "Oracle MiCRo: K heads + router per context (diagnostic)"

METHODS = (SINGLE, STATIC, ENSEMBLE, HYRE, SINGLE_RESIDUAL, MICRO, MICRO_ADAPTED, MICRO_ONLINE, MICRO_RESIDUAL, ORACLE)
ADAPTIVE_METHODS = (HYRE, SINGLE_RESIDUAL, MICRO_ADAPTED, MICRO_ONLINE, MICRO_RESIDUAL)
UNSEEN_WORDING_METHODS = (MICRO_ADAPTED_UNSEEN,)  # only on pools with held-out context wordings
RESIDUAL_CV_FOLDS = 4
DIAGNOSTICS = (SINGLE_WITH_CONTEXT, BEST_HEAD, ORACLE_MICRO)


@dataclass
class HeadTraining:
    """
    Optimization of heads (and router) on cached features: Stage 1, the baselines and the oracle. A field left at
    None keeps the library's default (`MiCRoRewardConfig`): what a user of `--freeze_backbone` gets.
    """

    num_train_epochs: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    router_balance_coef: float | None = None
    lr_scheduler_type: str | None = None
    warmup_steps: float | None = None
    readout: dict | None = None  # MiCRoConfig readout fields of the heads (None: the library's); the pool's must match

    def config_kwargs(self) -> dict:
        """The `MiCRoRewardConfig` arguments this training sets (the others keep the library's defaults)."""
        names = {"batch_size": "per_device_train_batch_size"}
        settings = dataclasses.asdict(self)
        settings.update(settings.pop("readout") or {})
        return {names.get(key, key): value for key, value in settings.items() if value is not None}

    def describe(self) -> str:
        changed = ", ".join(f"{key}={value}" for key, value in self.config_kwargs().items())
        return f"the library's defaults except {changed}" if changed else "the library's defaults"


@dataclass
class RouterTraining:
    """
    Optimization of the router in Stage 2 router adaptation (see `RouterAdaptationConfig`). `max_steps > 0` trains
    that many steps whatever the number of pairs (8 pairs per context then get as many updates as 32), overriding
    `num_train_epochs`.
    """

    num_train_epochs: float = 30
    learning_rate: float = 5e-3
    batch_size: int = 32
    router_anchor_coef: float = 1e-2
    max_steps: int = -1
    adaptation_likelihood: str = "pair"


@dataclass
class ComparisonSettings:
    """
    What one comparison trains.

    Args:
        num_heads: K of StaticMixture, the ensemble and MiCRo.
        adaptation_sizes: adaptation pairs per context for the adaptive methods' curves (nested draws); the largest
            is the one the main table reports.
        heads: optimization of every head-training run (Stage 1, baselines, oracle).
        router: optimization of router adaptation.
        online_eta: learning rate of the online router (1.0: exact Bayesian posterior).
        reported_adaptation: adaptation pairs per context of the main table (default: the largest size).
    """

    num_heads: int = 4
    adaptation_sizes: tuple[int, ...] = (8, 16, 32)
    heads: HeadTraining = field(default_factory=HeadTraining)
    router: RouterTraining = field(default_factory=RouterTraining)
    online_eta: float = 1.0
    reported_adaptation: int | None = None

    @property
    def reported_size(self) -> int:
        """The adaptation size the main table reports (`reported_adaptation`, default the largest)."""
        return self.reported_adaptation or max(self.adaptation_sizes)


@dataclass
class PoolSplit:
    """
    Pool pair indices of one seed's train / adaptation / test splits. `stage1_train` is what every method but the
    oracle trains on: `train` without the pairs of a held-out context, when one is held out (the oracle of that context
    still trains on its own pairs).
    """

    train: list[int]
    adaptation: list[int]
    test: list[int]
    stage1_train: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.stage1_train:
            self.stage1_train = list(self.train)


def split_pool(
    pool: CachedPairPool,
    contexts: Sequence[str],
    adaptation_per_context: int,
    test_per_context: int | None,
    seed: int,
    adaptation_share: float | None = None,
    held_out_context: str | None = None,
) -> PoolSplit:
    """
    One seed's split of the pool pairs of `contexts`. The pairs that have features with their context (the first
    `pool.num_with_context`) are the evaluation pairs: a seeded draw, stratified by context, makes
    `adaptation_per_context` of each context adaptation pairs and `test_per_context` test pairs. With
    `adaptation_share`, evaluation pairs are split by query instead (the pool's `query_id` column): a seeded
    `adaptation_share` of the evaluation queries adapt, every pair of the other ones tests. Every other pair of those
    contexts is a training pair (the same for every seed); `held_out_context` leaves its pairs out of Stage 1.
    """
    wanted = set(contexts)
    evaluation = [pair for pair in range(pool.num_with_context) if pool.context_ids[pair] in wanted]
    if adaptation_share is None:
        table = Dataset.from_dict({"pair": evaluation, "context_id": [pool.context_ids[pair] for pair in evaluation]})
        parts = split_by_context(
            table,
            context_column="context_id",
            fractions=None,
            sizes_per_context=(0, adaptation_per_context, test_per_context),
            seed=seed,
        )
        adaptation, test = list(parts["adaptation"]["pair"]), list(parts["test"]["pair"])
    else:
        query_ids = pool.dataset["query_id"]
        queries = sorted({query_ids[pair] for pair in evaluation})
        random.Random(seed).shuffle(queries)
        adapting = set(queries[: round(adaptation_share * len(queries))])
        adaptation = [pair for pair in evaluation if query_ids[pair] in adapting]
        test = [pair for pair in evaluation if query_ids[pair] not in adapting]
    train = [pair for pair in range(pool.num_with_context, len(pool)) if pool.context_ids[pair] in wanted]
    stage1_train = [pair for pair in train if pool.context_ids[pair] != held_out_context]
    return PoolSplit(train, adaptation, test, stage1_train)


def adaptation_subset(pool: CachedPairPool, adaptation: Sequence[int], pairs_per_context: int, seed: int) -> list[int]:
    """`pairs_per_context` adaptation pairs of every context; for one seed, smaller subsets are nested in larger ones."""
    table = Dataset.from_dict({"pair": list(adaptation), "context_id": [pool.context_ids[pair] for pair in adaptation]})
    return list(take_per_context(table, pairs_per_context, context_column="context_id", seed=seed)["pair"])


# ------------------------------------------------------------------------------------------------------------ training
def new_reward_model(backbone: PreTrainedModel, seed: int, **config_kwargs) -> MiCRoRewardModel:
    """Fresh heads and router (seeded) over the shared, frozen `backbone`; `config_kwargs` are MiCRoConfig fields."""
    set_seed(seed)
    return MiCRoRewardModel.from_backbone(backbone, **config_kwargs).freeze_backbone()


def copy_heads_and_router(model: MiCRoRewardModel) -> MiCRoRewardModel:
    """A model that shares `model`'s backbone and owns copies of its heads and router (the backbone is not copied)."""
    copy = MiCRoRewardModel(model.config, backbone=model.backbone)
    copy.heads.load_state_dict(model.heads.state_dict())
    copy.router.load_state_dict(model.router.state_dict())
    return copy.freeze_backbone()


def _common_training_args(output_dir: str, seed: int) -> dict:
    return dict(
        output_dir=output_dir,
        seed=seed,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


_TRAINERS = {
    "heads": (MiCRoRewardTrainer, MiCRoRewardConfig),
    "router": (RouterAdaptationTrainer, RouterAdaptationConfig),
}


def _train_on_pool(stage: str, model, dataset: Dataset, pool, tokenizer, seed: int, config: dict) -> MiCRoRewardModel:
    """
    Train `model` on `dataset` (rows of pool pairs, their features from `pool`) with the trainer of `stage` ("heads":
    Stage 1, "router": Stage 2), configured by `config` over the common arguments in a scratch folder, without
    printing the final metrics dictionary (a comparison runs dozens of short trainings); returns the model in eval mode.
    """
    trainer_class, config_class = _TRAINERS[stage]
    with tempfile.TemporaryDirectory(prefix=f"trl-micro-{stage}-") as output_dir:
        args = config_class(**_common_training_args(output_dir, seed), **config)
        trainer = trainer_class(
            model=model, args=args, train_dataset=dataset, data_collator=pool.features, processing_class=tokenizer
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return model.eval()


def train_heads(
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pool: CachedPairPool,
    pairs: Sequence[int],
    training: HeadTraining,
    seed: int,
    num_heads: int = 1,
    use_router: bool = True,
    loss_type: str = "mixture",
    with_context: bool = False,
    initial_heads: torch.Tensor | None = None,
    extra_columns: dict[str, Sequence] | None = None,
    config_overrides: dict | None = None,
) -> MiCRoRewardModel:
    """
    Train K heads (and a router, or StaticMixture's weight vector) on the pool pairs `pairs` (repeats allowed: a
    bootstrap resample) with the Stage 1 trainer; `initial_heads` (K, hidden) replaces the heads' initialization.
    `extra_columns` are added to the training dataset (one value per pair, e.g. a `latent_group` or a user column),
    `config_overrides` to the `MiCRoRewardConfig` (e.g. `latent_groups="user"`).
    """
    model = new_reward_model(backbone, seed, num_heads=num_heads, use_router=use_router, **(training.readout or {}))
    if initial_heads is not None:
        model.heads.weight.data.copy_(initial_heads)
        model.heads_untrained = False  # keep them: no EM initialization over them
    dataset = pool.feature_dataset(pairs, with_context)
    for name, values in (extra_columns or {}).items():
        dataset = dataset.add_column(name, list(values))
    grouping = (config_overrides or {}).get("latent_groups", "prompt_chosen")
    if (
        loss_type == "mixture"
        and num_heads > 1
        and grouping == "prompt_chosen"
        and "latent_group" not in dataset.column_names
    ):
        dataset = dataset.add_column("latent_group", pool.latent_groups(pairs, with_context))
    config = dict(
        **{**training.config_kwargs(), **(config_overrides or {})},
        num_heads=num_heads,
        use_router=use_router,
        loss_type=loss_type,
        freeze_backbone=True,
    )
    return _train_on_pool("heads", model, dataset, pool, tokenizer, seed, config)


def train_diverse_ensemble(
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pool: CachedPairPool,
    pairs: Sequence[int],
    training: HeadTraining,
    seed: int,
    num_members: int,
) -> list[MiCRoRewardModel]:
    """
    HyRe's ensemble: `num_members` BT heads, each trained on a bootstrap resample of `pairs` from a random prior
    (a fixed random head whose projection of the pairs' feature differences has unit variance).
    """
    generator = torch.Generator().manual_seed(seed)
    deltas = pool.tensors(pairs, with_context=False)
    scale = (deltas["chosen_reward"] - deltas["rejected_reward"]).pow(2).sum(dim=1).mean().rsqrt()
    members = []
    for member in range(num_members):
        resample = torch.randint(len(pairs), (len(pairs),), generator=generator).tolist()
        prior = torch.randn(1, deltas["chosen_reward"].shape[1], generator=generator) * scale
        members.append(
            train_heads(
                backbone,
                tokenizer,
                pool,
                [pairs[i] for i in resample],
                training,
                seed * 1000 + member,
                num_heads=1,
                initial_heads=prior,
            )
        )
    return members


def ensemble_head_margins(members: list[MiCRoRewardModel], pool: CachedPairPool, pairs: Sequence[int]) -> torch.Tensor:
    """(N, M) margins of every member on `pairs` (scored without their context)."""
    return torch.cat([score(member, pool, pairs, with_context=False).head_margins for member in members], dim=1)


def disagreement(head_margins: torch.Tensor) -> float:
    """Share of pairs on which at least two heads (or members) rank the pair differently."""
    signs = head_margins.sign()
    return float((signs.amax(dim=1) != signs.amin(dim=1)).float().mean())


def adapt_router(
    stage1: MiCRoRewardModel,
    tokenizer: PreTrainedTokenizerBase,
    pool: CachedPairPool,
    pairs: Sequence[int],
    training: RouterTraining,
    seed: int,
) -> MiCRoRewardModel:
    """Stage 2 router adaptation of a copy of `stage1` on the pool pairs `pairs`, scored with their context."""
    model = copy_heads_and_router(stage1)
    dataset = pool.feature_dataset(pairs, with_context=True)
    if training.adaptation_likelihood == "context":
        dataset = dataset.add_column("context_index", context_indices([pool.context_ids[pair] for pair in pairs]))
    config = dict(
        num_train_epochs=training.num_train_epochs,
        learning_rate=training.learning_rate,
        per_device_train_batch_size=training.batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        router_anchor_coef=training.router_anchor_coef,
        max_steps=training.max_steps,
        adaptation_likelihood=training.adaptation_likelihood,
    )
    return _train_on_pool("router", model, dataset, pool, tokenizer, seed, config)


def score(model: MiCRoRewardModel, pool: CachedPairPool, pairs: Sequence[int], with_context: bool) -> PairScores:
    """Head margins and router logits of `model` on the pool pairs `pairs`."""
    return score_pair_features(model, pool.tensors(pairs, with_context))


# ----------------------------------------------------------------------------------------------------- few-shot routing
def micro_online_routing(
    micro: MiCRoRewardModel, pool: CachedPairPool, pairs: Sequence[int], eta: float
) -> OnlineRouter:
    """
    MiCRo + online routing: one posterior per context id over `micro`'s heads, from the head margins of its pool
    pairs `pairs` (scored without their context), starting from the Stage-1 router's mean weights over those pairs'
    prompts with the context in them.
    """
    contexts = [pool.context_ids[pair] for pair in pairs]
    priors = router_priors(contexts, score(micro, pool, pairs, with_context=True).mixture_weights)
    return fit_online_router(contexts, score(micro, pool, pairs, with_context=False).head_margins, priors, eta)


def per_context_oracle_models(
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pool: CachedPairPool,
    split: PoolSplit,
    contexts: Sequence[str],
    training: HeadTraining,
    seed: int,
    num_heads: int = 1,
) -> dict[str, MiCRoRewardModel]:
    """The oracle's models: for every context, `num_heads` heads (and a router when K > 1) trained on that context's
    training pairs only."""
    return {
        context: train_heads(
            backbone, tokenizer, pool, pool.pairs_of_context(split.train, context), training, seed, num_heads=num_heads
        )
        for context in contexts
    }


def per_context_oracle_margins(
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pool: CachedPairPool,
    split: PoolSplit,
    training: HeadTraining,
    seed: int,
    num_heads: int = 1,
) -> torch.Tensor:
    """Test margins (N,) of the oracle (`per_context_oracle_models`), each context's model scoring its test pairs."""
    test_contexts = [pool.context_ids[pair] for pair in split.test]
    models = per_context_oracle_models(
        backbone, tokenizer, pool, split, sorted(set(test_contexts)), training, seed, num_heads
    )
    margins = torch.empty(len(split.test))
    for context, model in models.items():
        rows = [row for row, other in enumerate(test_contexts) if other == context]
        margins[rows] = score(model, pool, [split.test[row] for row in rows], with_context=False).margins
    return margins


def fit_pool_residual_heads(
    micro: MiCRoRewardModel, pool: CachedPairPool, pairs: Sequence[int], online: OnlineRouter
) -> ResidualHeads:
    """
    MiCRo + online routing + residual heads: per context id, a [`ResidualHeads`] residual fitted on its pool pairs
    `pairs` on top of `online`'s routed margins (lambda cross-validated, up to `RESIDUAL_CV_FOLDS` folds).
    """
    scores = score(micro, pool, pairs, with_context=False)
    contexts = [pool.context_ids[pair] for pair in pairs]
    return fit_residual_heads(online, contexts, scores.head_margins, scores.feature_deltas, RESIDUAL_CV_FOLDS)


def single_residual_margins(
    single: MiCRoRewardModel, pool: CachedPairPool, pairs: Sequence[int], single_test: PairScores, test_contexts
) -> torch.Tensor:
    """SingleReward + residual heads: test margins of `single` (scored as `single_test`) plus a residual per context
    fitted on its pool pairs `pairs`."""
    contexts = [pool.context_ids[pair] for pair in pairs]
    router = fit_online_router(contexts, score(single, pool, pairs, with_context=False).head_margins)
    residuals = fit_pool_residual_heads(single, pool, pairs, router)
    return single_test.margins + residuals.rewards(test_contexts, single_test.feature_deltas)


def reference_accuracy(
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pool: CachedPairPool,
    split: PoolSplit,
    training: HeadTraining,
    seed: int,
) -> dict[str, dict[str, float]]:
    """
    `{"single": acc, "oracle": acc}`: per-context test accuracy of SingleReward and of the per-context oracle, the two
    ends of the gap closed, trained on `split` with `training`.
    """
    test_contexts = [pool.context_ids[pair] for pair in split.test]
    single = train_heads(backbone, tokenizer, pool, split.stage1_train, training, seed, num_heads=1)
    margins = {
        "single": score(single, pool, split.test, with_context=False).margins,
        "oracle": per_context_oracle_margins(backbone, tokenizer, pool, split, training, seed),
    }
    return {name: per_context_accuracy(value, test_contexts)["accuracy"] for name, value in margins.items()}


# ---------------------------------------------------------------------------------------------------------- comparison
@dataclass
class ComparisonResult:
    """
    One seed of the comparison.

    Attributes:
        accuracy: `{method: per_context_accuracy dict}` on the test pairs (adaptive methods at the reported
            adaptation size), diagnostics included.
        adaptation: `{method: {pairs_per_context: per_context_accuracy dict}}` for the adaptive methods.
        head_usage: `{label: head_usage dict}` of the routed MiCRo variants on the test pairs.
        head_accuracy: `head_accuracy` dict of the Stage-1 MiCRo heads on the test pairs (scored without context).
        subsets: `{subset: {method: per_context_accuracy dict}}` on named subsets of the test pairs (the pool's boolean
            columns, e.g. DSP's `agreed` pairs).
        diagnostics: other per-seed figures (head agreement of MiCRo's heads, disagreement of HyRe's members).
        seconds: wall time of each training / adaptation step.
    """

    accuracy: dict = field(default_factory=dict)
    adaptation: dict = field(default_factory=dict)
    head_usage: dict = field(default_factory=dict)
    head_accuracy: dict = field(default_factory=dict)
    subsets: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


SUBSET_COLUMNS = ("agreed",)  # boolean pool columns whose test pairs are also reported on their own


def compare_methods(
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pool: CachedPairPool,
    split: PoolSplit,
    settings: ComparisonSettings,
    seed: int,
) -> ComparisonResult:
    """Train every method of the module docstring on `split` and score it on the test pairs (one seed)."""
    result = ComparisonResult()
    test_contexts = [pool.context_ids[pair] for pair in split.test]
    reported = settings.reported_size
    heads = settings.heads
    K = settings.num_heads
    margins_of: dict[str, torch.Tensor] = {}

    def record(name, margins):
        margins_of[name] = margins
        result.accuracy[name] = per_context_accuracy(margins, test_contexts)

    def timed(name):
        return stopwatch(result.seconds, name)

    with timed(SINGLE):
        single = train_heads(backbone, tokenizer, pool, split.stage1_train, heads, seed, num_heads=1)
    single_test = score(single, pool, split.test, with_context=False)
    record(SINGLE, single_test.margins)
    record(SINGLE_WITH_CONTEXT, score(single, pool, split.test, with_context=True).margins)

    with timed(STATIC):
        static = train_heads(backbone, tokenizer, pool, split.stage1_train, heads, seed, num_heads=K, use_router=False)
    record(STATIC, score(static, pool, split.test, with_context=False).margins)

    with timed(ENSEMBLE):
        ensemble = train_heads(
            backbone, tokenizer, pool, split.stage1_train, heads, seed, num_heads=K, loss_type="ensemble"
        )
    record(ENSEMBLE, score(ensemble, pool, split.test, with_context=False).head_margins.mean(dim=-1))
    with timed(HYRE):
        members = train_diverse_ensemble(backbone, tokenizer, pool, split.stage1_train, heads, seed, K)
    members_test = ensemble_head_margins(members, pool, split.test)
    result.diagnostics["hyre_member_disagreement"] = disagreement(members_test)
    result.diagnostics["shared_base_ensemble_disagreement"] = disagreement(
        score(ensemble, pool, split.test, with_context=False).head_margins
    )

    with timed(MICRO):
        micro = train_heads(backbone, tokenizer, pool, split.stage1_train, heads, seed, num_heads=K)
    micro_test_with_context = score(micro, pool, split.test, with_context=True)
    micro_test = score(micro, pool, split.test, with_context=False)
    record(MICRO, micro_test_with_context.margins)
    result.head_usage[f"{MICRO} (context in prompt)"] = head_usage(
        micro_test_with_context.mixture_weights, test_contexts
    )
    result.head_accuracy = head_accuracy(micro_test.head_margins, test_contexts)
    result.diagnostics["micro_head_agreement"] = float(head_agreement(micro_test.head_margins))
    result.accuracy[BEST_HEAD] = best_head_accuracy(micro_test.head_margins, test_contexts)

    adaptive = ADAPTIVE_METHODS + (UNSEEN_WORDING_METHODS if pool.has_unseen_wordings else ())
    for method in adaptive:
        result.adaptation[method] = {}
    for size in sorted(settings.adaptation_sizes):
        pairs = adaptation_subset(pool, split.adaptation, size, seed)
        contexts = [pool.context_ids[pair] for pair in pairs]
        margins = {}
        with timed(HYRE):
            hyre = fit_online_router(contexts, ensemble_head_margins(members, pool, pairs))
        margins[HYRE] = routed_margins(hyre, test_contexts, members_test)
        with timed(SINGLE_RESIDUAL):
            margins[SINGLE_RESIDUAL] = single_residual_margins(single, pool, pairs, single_test, test_contexts)
        with timed(MICRO_ONLINE):
            online = micro_online_routing(micro, pool, pairs, settings.online_eta)
        margins[MICRO_ONLINE] = routed_margins(online, test_contexts, micro_test.head_margins)
        with timed(MICRO_RESIDUAL):
            residuals = fit_pool_residual_heads(micro, pool, pairs, online)
        margins[MICRO_RESIDUAL] = margins[MICRO_ONLINE] + residuals.rewards(test_contexts, micro_test.feature_deltas)
        with timed(MICRO_ADAPTED):
            adapted = adapt_router(micro, tokenizer, pool, pairs, settings.router, seed)
        adapted_test = score(adapted, pool, split.test, with_context=True)
        margins[MICRO_ADAPTED] = adapted_test.margins
        if pool.has_unseen_wordings:
            margins[MICRO_ADAPTED_UNSEEN] = score(adapted, pool, split.test, with_context="unseen").margins
        for method, method_margins in margins.items():
            result.adaptation[method][size] = per_context_accuracy(method_margins, test_contexts)
            if size == reported:
                margins_of[method] = method_margins
        if size == reported:
            result.head_usage[f"{MICRO_ADAPTED} ({size} pairs per context)"] = head_usage(
                adapted_test.mixture_weights, test_contexts
            )
            online_weights = torch.stack([online.weights(context) for context in test_contexts])
            result.head_usage[f"{MICRO_ONLINE} ({size} pairs per context)"] = head_usage(online_weights, test_contexts)
    for method in adaptive:
        result.accuracy[method] = result.adaptation[method][reported]

    for name, num_heads in ((ORACLE, 1), (ORACLE_MICRO, K)):
        with timed(name):
            margins = per_context_oracle_margins(backbone, tokenizer, pool, split, heads, seed, num_heads)
        record(name, margins)
    order = (*METHODS, *(UNSEEN_WORDING_METHODS if pool.has_unseen_wordings else ()), *DIAGNOSTICS)
    result.accuracy = {name: result.accuracy[name] for name in order}
    for column in SUBSET_COLUMNS:
        if column in pool.dataset.column_names:
            flags = pool.dataset.select(split.test)[column]
            rows = [row for row, flag in enumerate(flags) if flag]
            subset_contexts = [test_contexts[row] for row in rows]
            result.subsets[column] = {
                name: per_context_accuracy(margins_of[name][rows], subset_contexts)
                for name in order
                if name in margins_of
            }
    return result


def leave_one_context_out(
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pool: CachedPairPool,
    split: PoolSplit,
    settings: ComparisonSettings,
    seed: int,
) -> dict:
    """
    Stage 1 without any pair of one context (`split.stage1_train`), then Stage 2 on that context from
    `settings.reported_size` pairs: per-context accuracy of SingleReward, MiCRo + online routing (with and without
    residual heads), SingleReward + residual heads and the per-context oracle, on every context's test pairs.
    """
    test_contexts = [pool.context_ids[pair] for pair in split.test]
    single = train_heads(backbone, tokenizer, pool, split.stage1_train, settings.heads, seed, num_heads=1)
    micro = train_heads(
        backbone, tokenizer, pool, split.stage1_train, settings.heads, seed, num_heads=settings.num_heads
    )
    pairs = adaptation_subset(pool, split.adaptation, settings.reported_size, seed)
    contexts = [pool.context_ids[pair] for pair in pairs]
    single_test, micro_test = (score(model, pool, split.test, with_context=False) for model in (single, micro))
    online = micro_online_routing(micro, pool, pairs, settings.online_eta)
    online_margins = routed_margins(online, test_contexts, micro_test.head_margins)
    single_router = fit_online_router(contexts, score(single, pool, pairs, with_context=False).head_margins)
    margins = {
        SINGLE: single_test.margins,
        MICRO_ONLINE: online_margins,
        MICRO_RESIDUAL: online_margins
        + fit_pool_residual_heads(micro, pool, pairs, online).rewards(test_contexts, micro_test.feature_deltas),
        SINGLE_RESIDUAL: single_test.margins
        + fit_pool_residual_heads(single, pool, pairs, single_router).rewards(
            test_contexts, single_test.feature_deltas
        ),
        ORACLE: per_context_oracle_margins(backbone, tokenizer, pool, split, settings.heads, seed),
    }
    return {name: per_context_accuracy(value, test_contexts) for name, value in margins.items()}
