import dataclasses
import importlib.util

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification

import trl_micro  # noqa: F401  (registers the MiCRo model with the Auto classes)
from trl_micro import MiCRoRewardConfig, MiCRoRewardModel, MiCRoRewardTrainer
from trl_micro.bundled.synthetic import SyntheticPreferenceConfig, generate_synthetic_preferences, rated_by_topic_owner
from trl_micro.data_utils import encode_prompt_completion, join_context
from trl_micro.evaluation import per_context_accuracy
from trl_micro.scoring import score_preference_pairs
from trl_micro.splits import take_per_context
from trl_micro.testing_utils import build_tiny_micro_model, build_tiny_tokenizer, save_tiny_backbone
from trl_micro.trainer import RouterAdaptationConfig, RouterAdaptationTrainer

from .conftest import REPO_ROOT, make_conflicting_pairs


def make_args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_train_epochs=3,
        logging_steps=1,
        report_to="none",
        seed=0,
        feature_cache_dir=str(tmp_path / "cache"),
    )
    defaults.update(overrides)
    return RouterAdaptationConfig(**defaults)


def adapt(model, tokenizer, tmp_path, data=None, **overrides):
    data = data if data is not None else make_conflicting_pairs(16)
    trainer = RouterAdaptationTrainer(
        model=model, args=make_args(tmp_path, **overrides), train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize(("use_feature_cache", "router_type"), [(True, "linear"), (False, "linear"), (True, "mlp")])
def test_only_router_parameters_change(tokenizer, tmp_path, use_feature_cache, router_type):
    model = build_tiny_micro_model(tokenizer, num_heads=3, router_type=router_type, router_hidden_size=16)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = adapt(model, tokenizer, tmp_path, use_feature_cache=use_feature_cache)
    assert ("pair_index" in trainer.train_dataset.column_names) == use_feature_cache
    router_parameters = {name for name, _ in model.named_parameters() if name.startswith("router.")}
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed == router_parameters and len(router_parameters) == (2 if router_type == "linear" else 4)
    assert {name for name, parameter in model.named_parameters() if parameter.requires_grad} == router_parameters


def test_logs_stage1_metrics_and_router_drift(tokenizer, tmp_path):
    trainer = adapt(build_tiny_micro_model(tokenizer, num_heads=2), tokenizer, tmp_path)
    logged = trainer.state.log_history[0]
    for key in ("loss", "mixture_nll", "accuracy", "router_entropy", "head_accuracy/1", "head_usage/0", "router_drift"):
        assert key in logged, key
    assert trainer.router_drift().item() > 0


def test_anchor_keeps_the_router_near_stage1(tokenizer, tmp_path):
    drifts = {}
    for coef in (0.0, 10.0):
        model = build_tiny_micro_model(tokenizer, num_heads=2)
        drifts[coef] = (
            adapt(model, tokenizer, tmp_path, router_anchor_coef=coef, learning_rate=5e-2).router_drift().item()
        )
    assert drifts[10.0] < 0.5 * drifts[0.0]


def test_adapted_checkpoint_round_trips_and_routes_full_texts(tokenizer, tmp_path):
    data = make_conflicting_pairs(16, conversational=True)
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    trainer = adapt(model, tokenizer, tmp_path, data=data)
    trainer.save_model(str(tmp_path / "adapted"))

    reloaded = MiCRoRewardModel.from_pretrained(str(tmp_path / "adapted")).eval()
    auto = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "adapted")).eval()
    assert isinstance(auto, MiCRoRewardModel) and auto.config.num_labels == 1
    for name, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value)
        torch.testing.assert_close(auto.state_dict()[name], value)

    # `logits` of a full text (context in the system message) is the reward routed for that context.
    row = data[0]
    prompt = join_context(row["prompt"], row["context"], model.config.context_template)
    ids, prompt_length = encode_prompt_completion(tokenizer, prompt, row["chosen"])
    input_ids = torch.tensor([ids])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids, prompt_lengths=torch.tensor([prompt_length]))
        routed = auto(input_ids=input_ids)
    assert routed.logits.shape == (1, 1)
    torch.testing.assert_close(routed.logits, expected.logits)
    torch.testing.assert_close(routed.mixture_weights, expected.mixture_weights)


def test_scored_margins_are_routed_reward_differences(tokenizer, tmp_path):
    model = build_tiny_micro_model(tokenizer, num_heads=3).eval()
    data = make_conflicting_pairs(4)
    scores = score_preference_pairs(model, data, tokenizer, feature_cache_dir=str(tmp_path / "cache"))
    assert scores.head_margins.shape == scores.router_logits.shape == (4, 3)
    for index, row in enumerate(data):
        prompt = join_context(row["prompt"], row["context"], model.config.context_template)
        rewards = []
        for side in ("chosen", "rejected"):
            ids, prompt_length = encode_prompt_completion(tokenizer, prompt, row[side])
            with torch.no_grad():
                rewards.append(
                    model(input_ids=torch.tensor([ids]), prompt_lengths=torch.tensor([prompt_length])).logits
                )
        torch.testing.assert_close(scores.margins[index], (rewards[0] - rewards[1]).squeeze(), rtol=1e-4, atol=1e-5)


def test_adapts_a_checkpoint_path(tokenizer, tmp_path):
    build_tiny_micro_model(tokenizer, num_heads=2).save_pretrained(tmp_path / "stage1")
    tokenizer.save_pretrained(tmp_path / "stage1")
    trainer = RouterAdaptationTrainer(
        model=str(tmp_path / "stage1"), args=make_args(tmp_path), train_dataset=make_conflicting_pairs(8)
    )
    assert isinstance(trainer.model, MiCRoRewardModel) and trainer.model.num_heads == 2


def test_bad_input_gives_clear_errors(tokenizer, tmp_path):
    model = build_tiny_micro_model(tokenizer)
    args = make_args(tmp_path)

    def build(data, model=model, args=args, **kwargs):
        return RouterAdaptationTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, **kwargs)

    without_context = make_conflicting_pairs(4).remove_columns(["context", "taste"])
    with pytest.raises(
        ValueError, match=r"no context column 'context'; columns present: \['chosen', 'prompt', 'rejected'\]"
    ):
        build(without_context)
    rows = make_conflicting_pairs(4).to_list()
    for bad, message in ((None, "is None"), ("   ", "is empty")):
        broken = [dict(row) for row in rows]
        broken[2]["context"] = bad
        with pytest.raises(ValueError, match=f"Row 2 of the train dataset: `context` {message}"):
            build(Dataset.from_list(broken))
    numbers = make_conflicting_pairs(4).remove_columns("context").add_column("context", [1, 2, 3, 4])
    with pytest.raises(ValueError, match="Row 0 of the train dataset: `context` must be text, got int"):
        build(numbers)
    with pytest.raises(
        ValueError, match=r"Row 0 of the train dataset: `context` has \d+ tokens, more than max_context_length=3"
    ):
        build(make_conflicting_pairs(4), args=make_args(tmp_path, max_context_length=3))
    with pytest.raises(ValueError, match="no router"):
        build(make_conflicting_pairs(4), model=build_tiny_micro_model(tokenizer, use_router=False))
    with pytest.raises(ValueError, match="takes no `peft_config`"):
        build(make_conflicting_pairs(4), peft_config=LoraConfig(r=2, target_modules=["q_proj"]))
    save_tiny_backbone(str(tmp_path / "backbone"), tokenizer)
    with pytest.raises(ValueError, match="is not a MiCRo checkpoint .* Stage 1 model"):
        RouterAdaptationTrainer(model=str(tmp_path / "backbone"), args=args, train_dataset=make_conflicting_pairs(4))
    for stage1_field in ({"freeze_backbone": False}, {"loss_type": "ensemble"}, {"num_heads": 3}):
        with pytest.raises(TypeError, match=f"no field '{next(iter(stage1_field))}'.*MiCRoRewardConfig"):
            make_args(tmp_path, **stage1_field)
    assert {"loss_type", "latent_groups", "freeze_backbone", "num_heads"}.isdisjoint(
        field.name for field in dataclasses.fields(RouterAdaptationConfig)
    )
    with pytest.raises(TypeError, match="RouterAdaptationConfig"):
        RouterAdaptationTrainer(
            model=model, args=MiCRoRewardConfig(str(tmp_path)), train_dataset=make_conflicting_pairs(4)
        )


def test_recipe_adapts_a_checkpoint_from_a_local_file(tokenizer, tmp_path):
    spec = importlib.util.spec_from_file_location("adapt_router", REPO_ROOT / "recipes" / "adapt_router.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    stage1 = build_tiny_micro_model(tokenizer, num_heads=2)
    stage1.save_pretrained(tmp_path / "stage1")
    tokenizer.save_pretrained(tmp_path / "stage1")
    make_conflicting_pairs(24).to_json(str(tmp_path / "pairs.jsonl"))

    recipe.main(
        *recipe.make_parser().parse_args_and_config(
            [
                "--model_name_or_path",
                str(tmp_path / "stage1"),
                "--dataset_name",
                str(tmp_path / "pairs.jsonl"),
                "--pairs_per_context",
                "4",
                "--num_train_epochs",
                "2",
                "--output_dir",
                str(tmp_path / "adapted"),
                "--feature_cache_dir",
                str(tmp_path / "cache"),
                "--report_to",
                "none",
            ]
        )
    )
    adapted = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "adapted"))
    assert (tmp_path / "adapted" / "tokenizer.json").exists()
    assert not torch.equal(adapted.router.weight, stage1.router.weight)
    torch.testing.assert_close(adapted.heads.weight, stage1.heads.weight)


@pytest.mark.parametrize("use_feature_cache", [True, False])
def test_context_likelihood_batches_carry_each_pairs_context(tokenizer, tmp_path, use_feature_cache):
    data = make_conflicting_pairs(16)
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = adapt(
        model,
        tokenizer,
        tmp_path,
        data=data,
        adaptation_likelihood="context",
        use_feature_cache=use_feature_cache,
        per_device_train_batch_size=16,
    )
    ids = {context: index for index, context in enumerate(sorted(set(data["context"])))}
    assert trainer.train_dataset["context_index"] == [ids[context] for context in data["context"]]
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch["context_index"].tolist()) == sorted(ids[context] for context in data["context"])
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed == {"router.weight", "router.bias"}


def test_context_likelihood_is_the_per_context_loss_of_the_batch(tokenizer, tmp_path):
    from trl_micro.losses import context_mixture_bt_loss, mixture_bt_loss

    trainer = adapt(
        build_tiny_micro_model(tokenizer, num_heads=3),
        tokenizer,
        tmp_path,
        adaptation_likelihood="context",
        num_train_epochs=1,
    )
    head_margins, router_logits = torch.randn(6, 3), torch.randn(6, 3)
    context_index = torch.tensor([0, 1, 0, 1, 1, 0])
    torch.testing.assert_close(
        trainer.mixture_nll(head_margins, router_logits, None, context_index),
        context_mixture_bt_loss(head_margins, router_logits, context_index).mean(),
    )
    assert not torch.allclose(
        trainer.mixture_nll(head_margins, router_logits, None, context_index),
        mixture_bt_loss(head_margins, router_logits).mean(),
    )
    with pytest.raises(ValueError, match="needs a `context_index` in every batch"):
        trainer.mixture_nll(head_margins, router_logits)


def test_context_likelihood_bad_input(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="adaptation_likelihood` must be one of"):
        make_args(tmp_path, adaptation_likelihood="user")
    tokenized = Dataset.from_dict(
        {
            "chosen_ids": [[5, 6, 7]],
            "rejected_ids": [[5, 6, 8]],
            "chosen_prompt_length": [2],
            "rejected_prompt_length": [2],
        }
    )
    with pytest.raises(ValueError, match="give it a `context_index` column"):
        RouterAdaptationTrainer(
            model=build_tiny_micro_model(tokenizer, num_heads=2),
            args=make_args(tmp_path, adaptation_likelihood="context"),
            train_dataset=tokenized,
            processing_class=tokenizer,
        )


# --------------------------------------------------------------------------------------------- synthetic contexts
def synthetic_stage1_model(tmp_path, seed: int = 0):
    """
    A Stage 1 model whose heads specialize on two conflicting subpopulations, and the data to adapt and test it on.

    Stage 1 sees no context. As in real data (HH: harmless raters get red-teaming prompts), which subpopulation rates
    a pair depends on the prompt's topic there, which lets the mixture split into one head per subpopulation. The
    adaptation and test pairs come from every topic, so the prompt no longer says who rates: only the context does.
    The tiny backbone is random and frozen (its last-token features already separate the two styles), so every
    Stage 1 and Stage 2 epoch runs on cached features. Its heads start at random (`head_init="random"`): the Stage 2
    tests below were calibrated on heads trained that way (with EM's start, Stage 1 routing alone already reaches 0.82
    on subpop-0, and a reworded context keeps the top head on 99.5% of pairs but loses 12 points of accuracy).
    """
    data = generate_synthetic_preferences(
        SyntheticPreferenceConfig(
            num_subpopulations=2, num_pairs_per_subpopulation=500, axes=("length", "formality"), seed=seed
        )
    )
    tokenizer = build_tiny_tokenizer(
        [row[c] for row in data.select(range(200)) for c in ("prompt", "chosen", "rejected")]
        + sorted(set(data["context"])),
        vocab_size=1000,
    )
    stage1 = rated_by_topic_owner(data.select(range(600)), num_subpopulations=2)
    adaptation, test = data.select(range(600, 800)), data.select(range(800, 1000))
    model = build_tiny_micro_model(tokenizer, num_heads=2, seed=seed)
    args = MiCRoRewardConfig(
        output_dir=str(tmp_path / "stage1"),
        num_heads=2,
        freeze_backbone=True,
        feature_cache_dir=str(tmp_path / "cache"),
        per_device_train_batch_size=32,
        num_train_epochs=30,
        learning_rate=2e-2,
        report_to="none",
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
        head_init="random",
    )
    MiCRoRewardTrainer(
        model=model, args=args, train_dataset=stage1.remove_columns("context"), processing_class=tokenizer
    ).train()
    return model, tokenizer, adaptation, test


def adapt_synthetic_stage1_model(tmp_path, **overrides):
    """Stage 1 on the synthetic data, its test scores, then router adaptation on 32 pairs per context."""
    model, tokenizer, adaptation, test = synthetic_stage1_model(tmp_path)
    cache = str(tmp_path / "cache")
    stage1 = score_preference_pairs(model, test, tokenizer, feature_cache_dir=cache)
    args = make_args(tmp_path, **{"num_train_epochs": 30, "logging_steps": 100, "disable_tqdm": True, **overrides})
    RouterAdaptationTrainer(
        model=model, args=args, train_dataset=take_per_context(adaptation, 32, seed=0), processing_class=tokenizer
    ).train()
    adapted = score_preference_pairs(model, test, tokenizer, feature_cache_dir=cache)
    return model, tokenizer, test, cache, stage1, adapted


@pytest.fixture(scope="module")
def synthetic_adaptation(tmp_path_factory):
    return adapt_synthetic_stage1_model(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def synthetic_context_adaptation(tmp_path_factory):
    """The per-context likelihood: one batch of all 64 pairs, no anchor."""
    return adapt_synthetic_stage1_model(
        tmp_path_factory.mktemp("synthetic-context"),
        num_train_epochs=200,
        per_device_train_batch_size=64,
        adaptation_likelihood="context",
        router_anchor_coef=0.0,
    )


@pytest.mark.parametrize("fixture", ["synthetic_adaptation", "synthetic_context_adaptation"])
def test_adapted_routing_beats_stage1_routing_on_every_context(fixture, request):
    *_, test, _, stage1, adapted = request.getfixturevalue(fixture)
    stage1_accuracy = per_context_accuracy(stage1.margins, test["context_id"])["accuracy"]
    adapted_accuracy = per_context_accuracy(adapted.margins, test["context_id"])["accuracy"]
    assert set(adapted_accuracy) == {"subpop-0", "subpop-1"}
    for context, accuracy in adapted_accuracy.items():
        assert accuracy > stage1_accuracy[context], (context, stage1_accuracy, adapted_accuracy)
        assert accuracy > 0.8, (context, adapted_accuracy)


REWORDED_CONTEXTS = {  # the synthetic contexts reworded; never seen in adaptation, most words shared
    0: "As a busy engineer, I want my answers short and casual.",
    1: "I'm a university professor and prefer thorough, formal answers in full paragraphs.",
}


def test_reworded_context_is_routed_like_its_original(synthetic_adaptation):
    # The router reads the context's text, not an id. A tiny random backbone has no notion of meaning, so true
    # paraphrases (no shared words) are out of its reach (benchmarks/studies/stage2_adaptation.py measures them); a rewording
    # that keeps most words must land on the same head.
    model, tokenizer, test, cache, _, adapted = synthetic_adaptation
    reworded = test.map(lambda row: {"context": REWORDED_CONTEXTS[row["subpopulation"]]})
    assert set(reworded["context"]).isdisjoint(test["context"])
    scores = score_preference_pairs(model, reworded, tokenizer, feature_cache_dir=cache)
    same_top_head = scores.mixture_weights.argmax(-1) == adapted.mixture_weights.argmax(-1)
    assert same_top_head.float().mean() > 0.9
    original = per_context_accuracy(adapted.margins, test["context_id"])["accuracy"]
    for context, accuracy in per_context_accuracy(scores.margins, test["context_id"])["accuracy"].items():
        # Same top head, but soft weights that move a little: within 8 of the 100 test pairs per context.
        assert accuracy == pytest.approx(original[context], abs=0.08), (context, accuracy, original)


def test_stage2_config_turns_off_checkpointing_without_a_deprecation_warning(tmp_path):
    """The frozen backbone needs no activation checkpointing; turning it off must not hit transformers' deprecated
    `gradient_checkpointing` alias (which warns on every config built)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = make_args(tmp_path)
    assert args.gradient_checkpointing is False
