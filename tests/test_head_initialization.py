"""Stage 1 head initialization by EM (`trl_micro.trainer.head_initialization`) and where the trainer uses it."""

import pytest
import torch

from trl_micro import MiCRoRewardModel, MiCRoRewardTrainer
from trl_micro.testing_utils import build_tiny_micro_model
from trl_micro.trainer.head_initialization import em_initial_heads

from .test_latent_groups import rater_pairs
from .test_trainer import make_args


def two_rater_differences(num_groups=80, pairs_per_group=4, dim=10, seed=0):
    """Pair differences of groups that follow one of two heads with opposite first coordinates, in uneven units."""
    generator = torch.Generator().manual_seed(seed)
    true_heads = torch.zeros(2, dim)
    true_heads[0, 0], true_heads[1, 0], true_heads[:, 1] = 3.0, -3.0, 1.0
    raters = torch.arange(num_groups) % 2
    groups = torch.arange(num_groups).repeat_interleave(pairs_per_group)
    differences = torch.randn(len(groups), dim, generator=generator)
    signs = torch.sign((differences * true_heads[raters[groups]]).sum(dim=1))
    units = torch.logspace(0, 2, dim)  # features on very different scales: the fit standardizes them
    return differences * signs[:, None] * units, groups, raters


def test_em_heads_follow_the_two_raters():
    differences, groups, raters = two_rater_differences()
    heads = em_initial_heads(differences, groups, num_heads=2, restarts=3, seed=0, show_progress=False)
    assert heads.shape == (2, differences.shape[1])
    group_ll = torch.zeros(len(raters), 2).index_add(0, groups, torch.nn.functional.logsigmoid(differences @ heads.T))
    assigned = group_ll.argmax(dim=1)
    agreement = (assigned == raters).float().mean().item()
    assert max(agreement, 1 - agreement) >= 0.95  # each head is one rater's (in either order)
    # and each head ranks its rater's own pairs right
    for head in range(2):
        rater = raters[assigned == head].mode().values
        own = raters[groups] == rater
        assert ((differences[own] @ heads[head]) > 0).float().mean() > 0.9


def correlated_two_rater_differences(num_groups, pairs_per_group=2, dim=576, seed=0, noise=0.5):
    """Two raters with opposite tastes over features that live near a 5-dimensional subspace of `dim` dimensions, as a
    backbone's do: with fewer pairs than dimensions, one head can fit every training pair."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(5, dim, generator=torch.Generator().manual_seed(7))
    raters = torch.arange(num_groups) % 2
    groups = torch.arange(num_groups).repeat_interleave(pairs_per_group)
    latent = torch.randn(len(groups), 5, generator=generator)
    tastes = torch.stack([3 * latent[:, 0] + latent[:, 1], -3 * latent[:, 0] + latent[:, 1]], dim=1)
    signs = torch.sign(tastes[torch.arange(len(groups)), raters[groups]])
    differences = latent @ mixing + noise * torch.randn(len(groups), dim, generator=generator)
    return differences * signs[:, None], groups, raters


def best_head_accuracy_per_rater(heads, differences, raters):
    return [
        max(((differences[raters == rater] @ head) > 0).float().mean().item() for head in heads) for rater in (0, 1)
    ]


def test_em_chosen_on_held_out_groups_does_not_overfit_fewer_pairs_than_dimensions():
    """240 pairs, 576 dimensions (the demo's shape): the fit chosen by held-out likelihood finds both raters, the one
    chosen by training likelihood (`holdout=0`, one small L2 weight: the former default) does not."""
    differences, groups, _ = correlated_two_rater_differences(120)
    test_differences, _, test_raters = correlated_two_rater_differences(400, pairs_per_group=1, seed=100)
    chosen = em_initial_heads(differences, groups, 2, seed=0, show_progress=False)
    assert min(best_head_accuracy_per_rater(chosen, test_differences, test_raters)) > 0.9
    overfit = em_initial_heads(differences, groups, 2, l2=0.02, holdout=0.0, seed=0, show_progress=False)
    assert min(best_head_accuracy_per_rater(overfit, test_differences, test_raters)) < 0.75


def test_em_is_seeded_and_checks_its_inputs():
    differences, groups, _ = two_rater_differences(num_groups=20)
    first = em_initial_heads(differences, groups, 2, restarts=2, seed=1, show_progress=False)
    torch.testing.assert_close(first, em_initial_heads(differences, groups, 2, restarts=2, seed=1, show_progress=False))
    with pytest.raises(ValueError, match="restarts must be >= 1"):
        em_initial_heads(differences, groups, 2, restarts=0)
    with pytest.raises(ValueError, match="groups"):
        em_initial_heads(differences, groups[:-1], 2)
    with pytest.raises(ValueError, match="l2 must be a weight > 0"):
        em_initial_heads(differences, groups, 2, l2=[])
    with pytest.raises(ValueError, match="holdout must be in"):
        em_initial_heads(differences, groups, 2, holdout=1.0)


@pytest.mark.parametrize("head_init", ["em", "random"])
def test_trainer_starts_fresh_heads_from_em_on_cached_features(tokenizer, tmp_path, head_init):
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    assert model.heads_untrained
    initial = model.heads.weight.detach().clone()
    args = make_args(tmp_path, freeze_backbone=True, head_init=head_init, max_steps=1, learning_rate=0.0)
    trainer = MiCRoRewardTrainer(model=model, args=args, train_dataset=rater_pairs(4), processing_class=tokenizer)
    trainer.train()
    changed = not torch.equal(model.heads.weight.detach(), initial)
    assert changed == (head_init == "em")  # learning rate 0: only the initialization can have moved them
    assert not model.heads_untrained  # trained once: a second train() continues from these heads


def test_trainer_keeps_loaded_heads_and_skips_em_without_cached_features(tokenizer, tmp_path):
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    model.save_pretrained(tmp_path / "trained")
    loaded = MiCRoRewardModel.from_pretrained(tmp_path / "trained")
    assert not loaded.heads_untrained
    for candidate, overrides in ((loaded, {"freeze_backbone": True}), (model, {"use_feature_cache": False})):
        initial = candidate.heads.weight.detach().clone()
        args = make_args(tmp_path, max_steps=1, learning_rate=0.0, **overrides)
        MiCRoRewardTrainer(model=candidate, args=args, train_dataset=rater_pairs(2), processing_class=tokenizer).train()
        torch.testing.assert_close(candidate.heads.weight.detach(), initial)


def test_head_init_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="`head_init` must be"):
        make_args(tmp_path, head_init="kmeans")
    with pytest.raises(ValueError, match="`head_init_restarts` must be"):
        make_args(tmp_path, head_init_restarts=0)
    with pytest.raises(ValueError, match="`head_init_l2` must be"):
        make_args(tmp_path, head_init_l2=0.0)
    with pytest.raises(ValueError, match="`head_init_l2` must be"):
        make_args(tmp_path, head_init_l2=[0.1, -1.0])
    with pytest.raises(ValueError, match="`head_init_holdout` must be"):
        make_args(tmp_path, head_init_holdout=-0.1)
    assert make_args(tmp_path, head_init_l2=0.5).head_init_l2 == [0.5]
