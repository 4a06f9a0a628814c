"""Choosing which pairs a user labels: BALD information, head disagreement and random, one at a time or in batches."""

import numpy as np
import pytest
import torch

from trl_micro import OnlineRouter
from trl_micro.personalization.adaptation import adapt_to_users, fit_online_router, router_priors
from trl_micro.personalization.query_selection import (
    choose_pairs_to_label,
    expected_information,
    head_disagreement,
    select_queries,
)
from trl_micro.scoring import PairScores

SURE = 8.0  # a margin whose Bradley-Terry probability is 0.9997


def test_a_pair_on_which_the_weighted_heads_disagree_is_preferred():
    weights = [0.5, 0.5, 0.0, 0.0]  # the posterior still weighs heads 0 and 1 only
    candidates = np.array(
        [
            [SURE, SURE, SURE, -SURE],  # only heads 2 and 3 disagree: they carry no weight
            [SURE, -SURE, SURE, SURE],  # heads 0 and 1 disagree
            [1.0, 1.0, -SURE, SURE],
        ]
    )
    information = expected_information(candidates, weights)
    assert information[1] == pytest.approx(np.log(2), abs=5e-3)  # minus the heads' own small uncertainty
    assert information[0] == pytest.approx(0.0, abs=1e-9) and information[2] == pytest.approx(0.0, abs=1e-9)
    assert head_disagreement(candidates, weights).argmax() == 1
    for strategy in ("information", "disagreement"):
        assert select_queries(candidates, weights, 1, strategy) == [1]


def test_information_is_zero_when_every_head_agrees():
    agreeing = np.array([[2.0, 2.0, 2.0], [-5.0, -5.0, -5.0], [0.0, 0.0, 0.0]])
    for weights in ([1 / 3] * 3, [0.7, 0.2, 0.1]):
        np.testing.assert_allclose(expected_information(agreeing, weights), 0.0, atol=1e-12)
        np.testing.assert_allclose(head_disagreement(agreeing, weights), 0.0, atol=1e-12)


def test_a_batch_does_not_ask_the_same_question_twice():
    """Three copies of the best question, then one that splits the heads the other way: a batch of two takes one copy
    and the other question (asked one by one on marginal information, the copies would tie for both places)."""
    split_01_23 = [SURE, SURE, -SURE, -SURE]
    split_02_13 = [SURE, -SURE, SURE, -SURE]
    candidates = np.array([split_01_23] * 3 + [split_02_13, [SURE, SURE, SURE, -SURE]])
    uniform = [0.25] * 4
    marginal = expected_information(candidates, uniform)
    assert marginal[0] == pytest.approx(marginal[3]) and marginal[0] > marginal[4]
    for strategy in ("information", "disagreement"):
        chosen = select_queries(candidates, uniform, 2, strategy)
        assert sorted(chosen) == [0, 3], strategy
    # answers resampled beyond a small number of answer sets still choose distinct, informative questions
    many = np.vstack([candidates] * 20)
    chosen = select_queries(many, uniform, 6, "information", max_answer_sets=4)
    assert len(set(chosen)) == 6
    assert {tuple(many[i]) for i in chosen[:2]} == {tuple(split_01_23), tuple(split_02_13)}


def test_random_is_seeded_and_respects_exclusions():
    candidates = np.random.default_rng(0).normal(size=(50, 3))
    first = select_queries(candidates, [1 / 3] * 3, 10, "random", seed=3, exclude=[0, 1, 2])
    assert first == select_queries(candidates, [1 / 3] * 3, 10, "random", seed=3, exclude=[0, 1, 2])
    assert len(set(first)) == 10 and not {0, 1, 2} & set(first)
    assert 0 not in select_queries(candidates, [1 / 3] * 3, 49, "information", exclude=[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "greedy"}, "`strategy` must be one of"),
        ({"weights": [0.5, 0.5]}, r"one weight per head \(3,\)"),
        ({"weights": [1.0, -0.5, 0.5]}, "non-negative"),
        ({"head_margins": np.full((4, 3), np.nan)}, "not finite"),
        ({"head_margins": np.zeros(4)}, r"\(num_candidates, num_heads\)"),
        ({"num_queries": 5}, "only 4 candidates are left"),
        ({"num_queries": -1}, "integer >= 0"),
        ({"exclude": [7]}, "outside the 4 candidates"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, message):
    arguments = {"head_margins": np.zeros((4, 3)), "weights": [1 / 3] * 3, "num_queries": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        select_queries(**arguments)


def planted_pool(num_pairs=60, num_heads=4, follows=2, seed=0):
    """Candidate pairs of one user who follows head `follows`: margins oriented chosen-over-rejected by that head."""
    margins = np.random.default_rng(seed).normal(scale=3.0, size=(num_pairs, num_heads))
    margins *= np.sign(margins[:, follows : follows + 1])
    return torch.tensor(margins)


def test_asking_by_information_finds_the_users_head_in_fewer_questions_than_random():
    contexts = ["user"] * 60
    posterior_on_truth = {}
    for strategy in ("information", "random"):
        values = []
        for seed in range(10):
            margins = planted_pool(seed=seed)
            rows = choose_pairs_to_label(contexts, margins, 3, strategy, seed=seed)
            router = OnlineRouter(num_heads=4)
            router.update("user", margins[rows])
            values.append(router.weights("user")[2].item())
        posterior_on_truth[strategy] = np.mean(values)
    assert posterior_on_truth["information"] > posterior_on_truth["random"] + 0.05, posterior_on_truth
    assert posterior_on_truth["information"] > 0.9


def test_adapt_to_users_learns_from_the_pairs_it_chose():
    margins = torch.cat([planted_pool(seed=1, follows=0), planted_pool(seed=2, follows=3)])
    contexts = ["a"] * 60 + ["b"] * 60
    scores = PairScores(margins, torch.zeros(120, 4), torch.randn(120, 5, generator=torch.Generator().manual_seed(0)))
    adapted = adapt_to_users(contexts, scores, num_queries=4, query_seed=0)
    rows = adapted.labelled_rows
    assert len(rows) == 8 and len(set(rows)) == 8
    assert [contexts[row] for row in rows] == ["a"] * 4 + ["b"] * 4
    # the router is the one fitted on exactly those pairs, from the priors over the whole pool
    expected = fit_online_router(
        [contexts[r] for r in rows], margins[rows], router_priors(contexts, scores.mixture_weights)
    )
    for context in ("a", "b"):
        torch.testing.assert_close(adapted.online_router.weights(context), expected.weights(context))
    assert adapted.online_router.weights("a").argmax() == 0 and adapted.online_router.weights("b").argmax() == 3
    assert adapted.residual_heads is not None and set(adapted.residual_heads.users()) == {"a", "b"}
    assert adapt_to_users(contexts, scores).labelled_rows is None  # without num_queries: every pair, as before
    with pytest.raises(ValueError, match="has 60 candidate pairs; 61 were asked for"):
        adapt_to_users(contexts, scores, num_queries=61)
