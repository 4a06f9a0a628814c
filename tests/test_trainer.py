import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel

from trl_micro import MiCRoRewardConfig, MiCRoRewardModel, MiCRoRewardTrainer
from trl_micro.data_utils import pair_labels, tokenize_preference_example
from trl_micro.testing_utils import build_tiny_micro_model, save_tiny_backbone
from trl_micro.trainer import build_micro_model

from .conftest import make_conflicting_pairs


def make_args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        feature_cache_dir=str(tmp_path / "cache"),
        num_heads=2,
    )
    defaults.update(overrides)
    return MiCRoRewardConfig(**defaults)


def head_and_router_parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "heads" in name or "router" in name}


def trained_parameters(trainer):
    return head_and_router_parameters(trainer.model)


@pytest.mark.parametrize("conversational", [False, True])
def test_trains_and_logs_mixture_metrics(tokenizer, tmp_path, conversational):
    data = make_conflicting_pairs(16, conversational=conversational)
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = MiCRoRewardTrainer(model=model, args=make_args(tmp_path), train_dataset=data, processing_class=tokenizer)
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("loss", "mixture_nll", "accuracy", "router_entropy", "head_accuracy/1", "head_usage/0"):
        assert key in logged, key
    assert logged["head_usage/0"] + logged["head_usage/1"] == pytest.approx(1.0, abs=1e-4)
    after = model.state_dict()
    for name in ("heads.weight", "router.weight", "backbone.layers.0.mlp.up_proj.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not train"
    if conversational:
        assert model.config.prompt_marker == "<|im_start|>assistant\n"


def test_implicit_prompt_is_split_at_the_marker(tokenizer, tmp_path):
    rows = [
        {
            "chosen": f"\n\nHuman: hello {i}\n\nAssistant: Sure, yes.",
            "rejected": f"\n\nHuman: hello {i}\n\nAssistant: Sure, no.",
        }
        for i in range(8)
    ]
    args = make_args(tmp_path, prompt_marker="\n\nAssistant:")
    trainer = MiCRoRewardTrainer(
        model=build_tiny_micro_model(tokenizer),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    example = trainer.train_dataset[0]
    prompt_ids = example["chosen_ids"][: example["chosen_prompt_length"]]
    assert tokenizer.decode(prompt_ids).endswith("Assistant:")
    assert trainer.model.config.prompt_marker_ids == tokenizer("\n\nAssistant:", add_special_tokens=False)["input_ids"]


def test_feature_cache_matches_the_slow_path(tokenizer, tmp_path):
    data = make_conflicting_pairs(24)
    results = {}
    for use_cache in (False, True):
        model = build_tiny_micro_model(tokenizer, num_heads=3, seed=1)
        # the same start on both paths: head_init="em" needs the cache's features (a documented difference)
        args = make_args(
            tmp_path, freeze_backbone=True, use_feature_cache=use_cache, num_train_epochs=2, head_init="random"
        )
        trainer = MiCRoRewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        assert ("pair_index" in trainer.train_dataset.column_names) == use_cache
        trainer.train()
        results[use_cache] = (trained_parameters(trainer), trainer.state.log_history[-2]["loss"])
    for name, value in results[False][0].items():
        torch.testing.assert_close(results[True][0][name], value, rtol=1e-4, atol=1e-5)
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-4)
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 1  # one segment in the backbone's folder


def test_frozen_backbone_trains_only_heads_and_router(tokenizer, tmp_path):
    model = build_tiny_micro_model(tokenizer)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    args = make_args(tmp_path, freeze_backbone=True)
    MiCRoRewardTrainer(
        model=model, args=args, train_dataset=make_conflicting_pairs(16), processing_class=tokenizer
    ).train()
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[name]), name


def test_lora_trains_and_saves_heads_and_router(tokenizer, tmp_path):
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    heads_before = model.heads.weight.detach().clone()
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = MiCRoRewardTrainer(
        model=model,
        args=make_args(tmp_path),
        train_dataset=make_conflicting_pairs(16),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    assert isinstance(trainer.model, PeftModel)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable)
    assert any("heads" in name for name in trainable) and any("router" in name for name in trainable)
    assert not any("lora" in name and ("heads" in name or "router" in name) for name in trainable)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batch).logits
    base = build_tiny_micro_model(tokenizer, num_heads=2)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert not torch.equal(reloaded.base_model.model.heads.weight, heads_before)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, MiCRoRewardModel)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-5)


def test_ensemble_and_single_head_baselines_train(tokenizer, tmp_path):
    for overrides in ({"loss_type": "ensemble", "num_heads": 3}, {"num_heads": 1}, {"use_router": False}):
        model_kwargs = {k: v for k, v in overrides.items() if k in ("num_heads", "use_router")}
        model = build_tiny_micro_model(tokenizer, **model_kwargs)
        args = make_args(tmp_path, **overrides)
        trainer = MiCRoRewardTrainer(
            model=model, args=args, train_dataset=make_conflicting_pairs(16), processing_class=tokenizer
        )
        trainer.train()
        assert torch.isfinite(torch.tensor(trainer.state.log_history[-2]["loss"]))


def test_bad_input_gives_clear_errors(tokenizer, tmp_path):
    model = build_tiny_micro_model(tokenizer)
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['rejected'\]"):
        MiCRoRewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b"}]),
            processing_class=tokenizer,
        )
    empty = Dataset.from_list(
        [
            {"prompt": "Question?", "chosen": "Sure.", "rejected": "Ok."},
            {"prompt": "Question?", "chosen": "  ", "rejected": "Ok."},
        ]
    )
    with pytest.raises(ValueError, match="Row 1: `chosen` is empty"):
        MiCRoRewardTrainer(model=model, args=args, train_dataset=empty, processing_class=tokenizer)
    with pytest.raises(ValueError, match="longer than max_length=4"):
        MiCRoRewardTrainer(
            model=model,
            args=make_args(tmp_path, max_length=4),
            train_dataset=make_conflicting_pairs(4),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="num_heads"):
        make_args(tmp_path, num_heads=0)
    with pytest.raises(TypeError, match="MiCRoRewardModel"):
        MiCRoRewardTrainer(
            model=torch.nn.Linear(2, 2), args=args, train_dataset=make_conflicting_pairs(4), processing_class=tokenizer
        )


def test_overlong_pairs_are_dropped(tokenizer, tmp_path):
    data = make_conflicting_pairs(8).remove_columns("context")
    lengths = [
        max(len(tokenizer(r["prompt"] + r[side] + tokenizer.eos_token)["input_ids"]) for side in ("chosen", "rejected"))
        for r in data
    ]
    max_length = sorted(lengths)[len(lengths) // 2]
    trainer = MiCRoRewardTrainer(
        model=build_tiny_micro_model(tokenizer),
        args=make_args(tmp_path, max_length=max_length),
        train_dataset=data,
        processing_class=tokenizer,
    )
    assert 0 < len(trainer.train_dataset) < len(data)
    assert all(
        len(r["chosen_ids"]) <= max_length and len(r["rejected_ids"]) <= max_length for r in trainer.train_dataset
    )


def test_streaming_dataset_trains_with_a_frozen_backbone(tokenizer, tmp_path, caplog):
    """The feature cache (on by default) cannot cache a stream: the trainer runs the backbone every step instead."""
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    heads_before = model.heads.weight.detach().clone()
    args = make_args(tmp_path, freeze_backbone=True, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="trl_micro"):
        trainer = MiCRoRewardTrainer(
            model=model,
            args=args,
            train_dataset=make_conflicting_pairs(16).to_iterable_dataset(),
            processing_class=tokenizer,
        )
    assert "Feature cache off: a streaming IterableDataset" in caplog.text
    trainer.train()
    assert trainer.state.global_step == 2 and not torch.equal(model.heads.weight, heads_before)
    assert not list((tmp_path / "cache").glob("*"))  # nothing was cached


def train_on(rows, tokenizer, tmp_path, **overrides):
    data = rows if isinstance(rows, Dataset) else Dataset.from_list(rows)
    return MiCRoRewardTrainer(
        model=build_tiny_micro_model(tokenizer),
        args=make_args(tmp_path, **overrides),
        train_dataset=data,
        processing_class=tokenizer,
    )


BAD_DATA = {
    "int chosen": (
        [{"prompt": "Question?", "chosen": 3, "rejected": 4}] * 2,
        r"Row 0: `chosen` must be text or a list of chat messages, got int 3",
    ),
    "margin None": (
        [{"prompt": "Q?", "chosen": "Sure.", "rejected": "Ok.", "margin": m} for m in (1.0, None)],
        r"Row 1 of the train dataset: `margin` is NoneType None",
    ),
    "margin string": (
        [{"prompt": "Q?", "chosen": "Sure.", "rejected": "Ok.", "margin": "1.0"}] * 2,
        r"Row 0 of the train dataset: `margin` is str '1.0'",
    ),
    "empty dataset": (Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}), "The train dataset is empty"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_named_by_row_and_column(tokenizer, tmp_path, case):
    rows, message = BAD_DATA[case]
    with pytest.raises(ValueError, match=message):
        train_on(rows, tokenizer, tmp_path)


def test_bad_values_met_later_are_named_too(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"Row 1 of a batch: `margin` is float nan"):  # a stream is checked per batch
        pair_labels([{"margin": 1.0}, {"margin": float("nan")}])
    implicit = {"chosen": "\n\nHuman: hi\n\nAssistant: Sure.", "rejected": "\n\nHuman: hi\n\nAssistant: Sure."}
    with pytest.raises(ValueError, match="Row 5: `chosen` and `rejected` are identical"):  # scoring an identical pair
        tokenize_preference_example(implicit, 5, tokenizer, "{context}\n\n", None, "\n\nAssistant:")


def test_missing_model_path_is_named(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="`model`: there is no model directory at .*such-model"):
        MiCRoRewardTrainer(
            model=str(tmp_path / "no" / "such-model"),
            args=make_args(tmp_path),
            train_dataset=make_conflicting_pairs(4),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("implicit_prompt", [False, True])
def test_identical_pairs_are_dropped_with_a_count(tokenizer, tmp_path, caplog, implicit_prompt):
    rows = make_conflicting_pairs(8).remove_columns(["context", "taste"]).to_list()
    if implicit_prompt:
        rows = [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]} for row in rows]
    for index in (1, 4):
        rows[index]["rejected"] = rows[index]["chosen"]
    with caplog.at_level(logging.WARNING, logger="trl_micro"):
        trainer = train_on(rows, tokenizer, tmp_path, prompt_marker="\n" if implicit_prompt else None)
    assert len(trainer.train_dataset) == 6
    assert "Dropped 2 of 8 train pairs identical (`chosen` == `rejected`)" in caplog.text
    trainer.train()
    with pytest.raises(ValueError, match=r"Every pair of the train dataset is identical \(`chosen` == `rejected`\)"):
        train_on([{**row, "rejected": row["chosen"]} for row in rows], tokenizer, tmp_path)


def test_fresh_heads_and_router_are_drawn_from_the_seed(tokenizer, tmp_path):
    """A backbone path wrapped with fresh heads (`build_micro_model`, what the trainer and `trl-micro train` do) gives
    the same heads and router for the same `args.seed`, whatever the global RNG did before, and others for another."""
    backbone = save_tiny_backbone(str(tmp_path / "backbone"), tokenizer)

    def fresh(seed, global_seed):
        torch.manual_seed(global_seed)
        return head_and_router_parameters(build_micro_model(backbone, make_args(tmp_path, num_heads=3, seed=seed)))

    first, again, other = fresh(7, global_seed=1), fresh(7, global_seed=2), fresh(8, global_seed=1)
    assert first.keys() == again.keys() and {"heads.weight", "router.weight"} <= first.keys()
    for name in first:
        torch.testing.assert_close(first[name], again[name], rtol=0, atol=0)
    assert not torch.equal(first["heads.weight"], other["heads.weight"])


def test_lora_run_resumes_from_a_checkpoint(tokenizer, tmp_path):
    """A LoRA run's checkpoints carry the MiCRo config and code beside the adapter (so that they load as models); the
    run still resumes from one, to the same end as an uninterrupted run."""
    backbone = save_tiny_backbone(str(tmp_path / "backbone"), tokenizer)

    def run(max_steps, resume=None):
        args = make_args(
            tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=1, per_device_train_batch_size=4
        )
        trainer = MiCRoRewardTrainer(
            model=backbone,
            args=args,
            train_dataset=make_conflicting_pairs(16),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trained_parameters(trainer)

    uninterrupted = run(3)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert {"adapter_config.json", "config.json", "modeling_micro.py"} <= {path.name for path in checkpoint.iterdir()}
    assert isinstance(MiCRoRewardModel.from_pretrained(checkpoint), MiCRoRewardModel)
    resumed = run(3, resume=str(checkpoint))
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value)


def test_lora_on_a_frozen_backbone_trains_the_adapter(tokenizer, tmp_path):
    """`freeze_backbone=True` with a `peft_config`: the backbone's own weights stay, the adapter, heads and router
    train."""
    trainer = MiCRoRewardTrainer(
        model=build_tiny_micro_model(tokenizer, num_heads=2),
        args=make_args(tmp_path, freeze_backbone=True, max_steps=2),
        train_dataset=make_conflicting_pairs(16),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
    )
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable) and any("heads" in name for name in trainable)
    assert not any("base_layer" in name for name in trainable)
