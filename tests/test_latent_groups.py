"""Stage 1 latent groups: pairs sharing a prompt and a chosen response share one latent head, and one batch."""

import pytest
import torch
from datasets import Dataset

from trl_micro import MiCRoRewardTrainer
from trl_micro.losses import context_mixture_bt_loss, head_agreement, mixture_bt_loss
from trl_micro.testing_utils import build_tiny_micro_model
from trl_micro.trainer.data_collator import GroupedBatchSampler, latent_groups

from .test_trainer import make_args

ANSWERS = {"short": "Sure.", "long": "Here is a detailed answer with every step explained.", "plain": "Ok."}


def rater_pairs(num_prompts: int) -> Dataset:
    """Two raters per prompt: each prefers its own style to the two others, so short/long pairs come in both orders."""
    rows = []
    for i in range(num_prompts):
        prompt = f"Question number {i}: how do I cook rice?\n"
        for taste in ("short", "long"):
            for other in ANSWERS:
                if other != taste:
                    rows.append(
                        {"prompt": prompt, "chosen": ANSWERS[taste], "rejected": ANSWERS[other], "taste": taste}
                    )
    return Dataset.from_list(rows)


def test_latent_groups_number_equal_keys_in_order():
    assert latent_groups([[1, 2], [3], [1, 2], [4], [3]]) == [0, 1, 0, 2, 1]
    assert latent_groups(["a", "b", "a"]) == [0, 1, 0]


def test_grouped_batches_hold_whole_groups_and_cover_every_row_once():
    groups = [0, 0, 1, 2, 2, 2, 3, 4, 4, 5]
    sampler = GroupedBatchSampler(groups, batch_size=4, seed=0)
    assert sampler.groups_per_batch == round(4 * 6 / 10)
    first = list(sampler)
    assert len(first) == len(sampler)
    assert sorted(row for batch in first for row in batch) == list(range(10))
    for batch in first:
        batch_groups = {groups[row] for row in batch}
        assert all(
            sum(g == group for g in groups) == sum(groups[row] == group for row in batch) for group in batch_groups
        )
    assert list(sampler) != first  # the next epoch reshuffles the groups
    sampler.set_epoch(0)
    assert list(sampler) == first  # seeded by the epoch


def test_one_pair_per_group_is_the_per_pair_loss():
    margins, logits = torch.randn(6, 3), torch.randn(6, 3)
    torch.testing.assert_close(
        context_mixture_bt_loss(margins, logits, torch.arange(6)), mixture_bt_loss(margins, logits)
    )
    grouped = context_mixture_bt_loss(margins, logits, torch.tensor([0, 0, 1, 1, 1, 2]))
    assert grouped.shape == (3,)


def test_head_agreement_is_one_for_identical_heads_and_zero_for_opposite_ones():
    margins = torch.randn(50, 1)
    assert head_agreement(torch.cat([margins, 2 * margins], dim=1)) == pytest.approx(1.0)
    assert head_agreement(torch.cat([margins, -margins], dim=1)) == pytest.approx(0.0)


@pytest.mark.parametrize("use_feature_cache", [True, False])
def test_trainer_batches_whole_groups_and_fits_them_together(tokenizer, tmp_path, use_feature_cache):
    data = rater_pairs(6)  # 12 groups of 2 pairs (one rater, one preferred answer, two rejected ones)
    seen_batches = []
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    args = make_args(tmp_path, freeze_backbone=True, use_feature_cache=use_feature_cache, per_device_train_batch_size=4)
    trainer = MiCRoRewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    groups = trainer.train_dataset["latent_group"]
    assert len(set(groups)) == 12 and all(groups.count(group) == 2 for group in set(groups))
    collate = trainer.data_collator

    def recording_collator(examples):
        seen_batches.append([example["latent_group"] for example in examples])
        return collate(examples)

    trainer.data_collator = recording_collator
    trainer.train()
    assert seen_batches and all(all(batch.count(group) == 2 for group in batch) for batch in seen_batches)
    logged = [entry for entry in trainer.state.log_history if "head_agreement" in entry]
    assert logged and 0.0 <= logged[-1]["head_agreement"] <= 1.0


def test_pair_latents_and_the_ensemble_loss_are_not_grouped(tokenizer, tmp_path):
    data = rater_pairs(3)
    for overrides in ({"latent_groups": "pair"}, {"loss_type": "ensemble"}):
        model = build_tiny_micro_model(tokenizer, num_heads=2)
        trainer = MiCRoRewardTrainer(
            model=model,
            args=make_args(tmp_path, freeze_backbone=True, **overrides),
            train_dataset=data,
            processing_class=tokenizer,
        )
        assert "latent_group" not in trainer.train_dataset.column_names
    with pytest.raises(ValueError, match="latent_groups"):
        make_args(tmp_path, latent_groups="prompt")
