"""Per-user mixture weights: EM against a direct maximization, the leave-one-out rule, and which users get which."""

import pytest
import torch

from trl_micro.personalization.mixture_weights import (
    choose_routing,
    leave_one_out_log_likelihood,
    mixture_weights,
    posterior_weights,
    user_weights,
)


def simulated_user(head_mix, num=64, seed=0):
    """Head margins of comparisons whose labels each come from a head drawn from `head_mix`."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(num, len(head_mix), generator=generator, dtype=torch.float64) * 3
    heads = torch.multinomial(torch.tensor(head_mix, dtype=torch.float64), num, replacement=True, generator=generator)
    prefers = torch.sigmoid(base[torch.arange(num), heads])
    flip = torch.rand(num, generator=generator, dtype=torch.float64) > prefers
    return torch.where(flip[:, None], -base, base)


def test_em_reaches_the_map_of_a_direct_maximization():
    """The MAP objective maximized directly (L-BFGS over softmax logits) gives EM's weights."""
    margins = simulated_user([0.6, 0.4, 0.0], num=40)
    prior = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    strength = 3.0
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        weights = torch.softmax(logits, 0)
        objective = torch.log(torch.sigmoid(margins) @ weights).sum() + strength * (prior * weights.log()).sum()
        (-objective).backward()
        return -objective

    optimizer.step(closure)
    fitted = mixture_weights(margins, prior, prior_strength=strength)
    torch.testing.assert_close(fitted, torch.softmax(logits.detach(), 0), atol=1e-5, rtol=0)
    torch.testing.assert_close(mixture_weights(margins[:0], prior), prior)  # no comparison: the prior


def test_leave_one_out_equals_refitting_without_each_comparison():
    margins = simulated_user([0.5, 0.5], num=9, seed=3)
    for rule, fit in (("posterior", posterior_weights), ("mixture", mixture_weights)):
        expected = sum(
            float(torch.log((fit(torch.cat([margins[:i], margins[i + 1 :]])) * torch.sigmoid(margins[i])).sum()))
            for i in range(len(margins))
        )
        assert leave_one_out_log_likelihood(margins, rule) == pytest.approx(expected, abs=1e-6)


def test_a_mixed_user_gets_mixture_weights_and_a_pure_one_the_posterior():
    mixed = simulated_user([0.5, 0.5, 0.0], num=64)
    weights, rule = user_weights(mixed, "auto")
    assert rule == "mixture" and weights[2] < 0.25 and min(weights[0], weights[1]) > 0.2
    assert posterior_weights(mixed).max() > 0.99  # the posterior pushes the mixed user to one head
    assert choose_routing(simulated_user([1.0, 0.0, 0.0], num=64, seed=1)) == "posterior"
    assert choose_routing(mixed[:3]) == "posterior"  # too few comparisons to choose
    with pytest.raises(ValueError, match="`routing` must be one of"):
        user_weights(mixed, "median")
    with pytest.raises(ValueError, match="positive weights summing to 1"):
        mixture_weights(mixed, [0.5, 0.5, 0.5])
