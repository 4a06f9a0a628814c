"""benchmarks/studies/latent_recovery.py: the EM fit of the grouped mixture and its cannot-link E-step."""

import pytest
import torch
from datasets import Dataset

from benchmarks.harness.pair_pool import CachedPairPool
from benchmarks.studies.latent_recovery import joint_assignment, purity, reversal_components, separability
from trl_micro.trainer.head_initialization import fit_mixture_em, random_responsibilities


def planted_mixture(num_groups=60, pairs_per_group=4, dim=6, seed=0):
    """Pair differences of groups that each follow one of two opposite-leaning heads, labelled by that head."""
    generator = torch.Generator().manual_seed(seed)
    true_heads = torch.zeros(2, dim, dtype=torch.float64)
    true_heads[0, 0], true_heads[1, 0], true_heads[:, 1] = 3.0, -3.0, 1.0
    labels = [group % 2 for group in range(num_groups)]
    groups = torch.arange(num_groups).repeat_interleave(pairs_per_group)
    differences = torch.randn(len(groups), dim, generator=generator, dtype=torch.float64)
    signs = torch.sign((differences * true_heads[torch.tensor(labels)[groups]]).sum(dim=1))
    return differences * signs[:, None], groups, [str(label) for label in labels]


def test_the_truth_start_keeps_a_planted_mixture_and_random_starts_find_it():
    differences, groups, labels = planted_mixture()
    truth = torch.nn.functional.one_hot(torch.tensor([int(label) for label in labels]), 2).double()
    _, kept, truth_log_likelihood = fit_mixture_em(differences, groups, truth, l2=0.01)
    assert purity(kept, labels) == 1.0
    start = random_responsibilities(len(labels), 2, torch.Generator().manual_seed(0))
    _, fitted, log_likelihood = fit_mixture_em(differences, groups, start, l2=0.01)
    assert purity(fitted, labels) >= 0.95 and log_likelihood == pytest.approx(truth_log_likelihood, abs=1e-3)
    # the cannot-link E-step plugs into the same fit (no reversals here: it is the hard assignment)
    _, hard, _ = fit_mixture_em(
        differences, groups, start, 0.01, e_step=lambda group_ll, _: joint_assignment(group_ll, [])
    )
    assert set(hard.sum(dim=1).tolist()) == {1.0} and purity(hard, labels) >= 0.95


def test_purity_is_one_for_a_relabelled_truth_and_chance_for_one_head():
    assignment = torch.nn.functional.one_hot(torch.tensor([1, 1, 0, 0]), 2).double()
    assert purity(assignment, ["a", "a", "b", "b"]) == 1.0
    assert purity(torch.ones(4, 1), ["a", "a", "b", "b"]) == 0.5


def test_reversed_groups_of_a_prompt_are_kept_apart():
    dataset = Dataset.from_dict(
        {
            "prompt": ["p", "p", "p", "q", "q"],
            "chosen": ["a", "a", "b", "a", "c"],
            "rejected": ["b", "c", "a", "b", "d"],
        }
    )
    pool = CachedPairPool(dataset=dataset, features=None, context_ids=["x"] * 5, num_with_context=0)
    groups = torch.tensor([0, 0, 1, 2, 3])  # (p, a), (p, b) reverse each other on a-b; q's groups do not
    components = reversal_components(pool, range(5), groups)
    assert components == [([0, 1], [(0, 1)])]
    group_ll = torch.tensor([[-1.0, -3.0], [-1.5, -2.0], [-1.0, -5.0], [-2.0, -1.0]])
    assigned = joint_assignment(group_ll, components).argmax(dim=1).tolist()
    # every group alone prefers head 0 (but the last); the reversed pair splits where it costs least: group 1 moves
    assert assigned == [0, 1, 0, 1]


def test_separability_finds_a_context_the_features_carry_and_not_one_they_do_not():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 8, generator=generator, dtype=torch.float64)
    prompts = [f"prompt {i // 2}" for i in range(400)]
    carried = ["a" if value > 0 else "b" for value in features[:, 0].tolist()]
    noise = ["a" if value > 0 else "b" for value in torch.randn(400, generator=generator).tolist()]
    assert separability(features, carried, prompts, seed=0)["accuracy"] > 0.9
    unrelated = separability(features, noise, prompts, seed=0)
    assert unrelated["accuracy"] < 0.65 and 0.5 <= unrelated["majority"] < 0.65
