"""adapt_to_users: online routing then residual heads per context, from a few labelled pairs."""

import pytest
import torch

from trl_micro import OnlineRouter, ResidualHeads, UserAdaptation, adapt_to_users
from trl_micro.personalization.adaptation import fit_online_router, fit_residual_heads, routed_margins, router_priors
from trl_micro.scoring import PairScores


def _scores(num_pairs: int = 24, num_heads: int = 3, hidden: int = 8, seed: int = 0) -> tuple[list[str], PairScores]:
    generator = torch.Generator().manual_seed(seed)
    contexts = ["alice" if i % 2 else "bob" for i in range(num_pairs)]
    head_margins = torch.randn(num_pairs, num_heads, generator=generator)
    head_margins[::2, 0] = head_margins[::2, 0].abs() + 1.0  # bob's pairs all agree with head 0
    scores = PairScores(
        head_margins,
        torch.randn(num_pairs, num_heads, generator=generator),
        torch.randn(num_pairs, hidden, generator=generator),
    )
    return contexts, scores


def test_adaptation_is_the_online_router_then_residual_heads():
    contexts, scores = _scores()
    adapted = adapt_to_users(contexts, scores)
    router = fit_online_router(contexts, scores.head_margins, router_priors(contexts, scores.mixture_weights))
    for user in ("alice", "bob"):
        torch.testing.assert_close(adapted.online_router.weights(user), router.weights(user))
    assert adapted.online_router.weights("bob").argmax() == 0
    residuals = fit_residual_heads(router, contexts, scores.head_margins, scores.feature_deltas)
    expected = routed_margins(router, contexts, scores.head_margins) + residuals.rewards(
        contexts, scores.feature_deltas
    )
    torch.testing.assert_close(adapted.margins(scores, contexts), expected)
    torch.testing.assert_close(
        adapted.margins(scores, contexts, with_residuals=False), routed_margins(router, contexts, scores.head_margins)
    )


def test_saved_stores_load_into_the_reward(tmp_path):
    contexts, scores = _scores()
    paths = adapt_to_users(contexts, scores).save(tmp_path / "stage2")
    assert set(paths) == {"online_router", "residual_heads"}
    assert OnlineRouter.load(paths["online_router"]).users() == ["alice", "bob"]
    assert set(ResidualHeads.load(paths["residual_heads"]).users()) == {"alice", "bob"}
    routing_only = adapt_to_users(contexts, scores, residual_heads=False)
    assert routing_only.residual_heads is None
    assert set(routing_only.save(tmp_path / "routing_only")) == {"online_router"}


def test_uniform_prior_is_hyre_reweighting():
    contexts, scores = _scores()
    uniform = torch.full_like(scores.mixture_weights, 1 / 3)
    adapted = adapt_to_users(contexts, scores, prior_weights=uniform, residual_heads=False)
    likelihood = torch.nn.functional.logsigmoid(scores.head_margins[1::2]).sum(dim=0).exp()
    torch.testing.assert_close(adapted.online_router.weights("alice"), (likelihood / likelihood.sum()).float())


def test_bad_input_is_refused():
    contexts, scores = _scores()
    with pytest.raises(ValueError, match="23 user ids for 24 scored pairs"):
        adapt_to_users(contexts[:-1], scores)
    with pytest.raises(ValueError, match="at least 2 labelled pairs per user"):
        adapt_to_users(["solo", *contexts[1:]], scores)
    assert isinstance(adapt_to_users(["solo", *contexts[1:]], scores, residual_heads=False), UserAdaptation)


def test_routing_rules_fit_mixture_weights_for_mixed_users():
    """ "mixture" stores each user's EM weights; "auto" picks per user; "posterior" is the online router's."""
    from trl_micro.personalization.mixture_weights import mixture_weights, user_weights

    contexts, scores = _scores(num_pairs=48)
    priors = router_priors(contexts, scores.mixture_weights)
    mixed = adapt_to_users(contexts, scores, routing="mixture", residual_heads=False)
    auto = adapt_to_users(contexts, scores, routing="auto", residual_heads=False)
    for user in ("alice", "bob"):
        rows = [row for row, other in enumerate(contexts) if other == user]
        expected = mixture_weights(scores.head_margins[rows], priors[user])
        torch.testing.assert_close(mixed.online_router.weights(user, dtype=torch.float64), expected)
        assert mixed.routing_rules[user] == "mixture" and mixed.online_router.num_updates(user) == len(rows)
        assert auto.routing_rules[user] == user_weights(scores.head_margins[rows], "auto", priors[user])[1]
    assert set(adapt_to_users(contexts, scores, residual_heads=False).routing_rules.values()) == {"posterior"}
    with pytest.raises(ValueError, match="`routing` must be one of"):
        adapt_to_users(contexts, scores, routing="vote")


def test_old_names_keep_working_with_a_future_warning():
    contexts, scores = _scores()
    with pytest.warns(FutureWarning, match="adapt_to_users"):
        old = __import__("trl_micro").adapt_to_contexts(contexts, scores, residual_heads=False)
    torch.testing.assert_close(
        old.online_router.weights("bob"),
        adapt_to_users(contexts, scores, residual_heads=False).online_router.weights("bob"),
    )
    import importlib
    import sys

    for old_path, new_path in (
        ("trl_micro.online_router", "trl_micro.personalization.online_router"),
        ("trl_micro.context_adaptation", "trl_micro.personalization.adaptation"),
    ):
        sys.modules.pop(old_path, None)
        with pytest.warns(FutureWarning, match=new_path):
            module = importlib.import_module(old_path)
        assert module is importlib.import_module(new_path)
    from trl_micro.personalization import online_router

    with pytest.warns(FutureWarning, match="UserState"):
        assert online_router.ContextState is online_router.UserState
