import math

import pytest
import torch

from trl_micro.losses import (
    balance_penalty,
    context_mixture_bt_loss,
    ensemble_bt_loss,
    entropy_penalty,
    mixture_bt_loss,
)


def direct_mixture_nll(margins, router_logits):
    weights = torch.softmax(router_logits.double(), dim=-1)
    return -torch.log((weights * torch.sigmoid(margins.double())).sum(dim=-1))


@pytest.mark.parametrize("num_heads", [1, 2, 5])
def test_mixture_loss_equals_direct_computation(num_heads):
    torch.manual_seed(num_heads)
    margins = torch.randn(64, num_heads) * 3
    router_logits = torch.randn(64, num_heads) * 2
    loss = mixture_bt_loss(margins, router_logits)
    torch.testing.assert_close(loss.double(), direct_mixture_nll(margins, router_logits), rtol=1e-5, atol=1e-6)


def test_single_head_is_plain_bradley_terry():
    margins = torch.randn(16, 1)
    loss = mixture_bt_loss(margins, torch.zeros(16, 1))
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(margins[:, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixture_loss_is_finite_for_extreme_logits(dtype):
    margins = torch.tensor([[1e4, -1e4], [-1e4, -1e4], [1e4, 1e4], [0.0, -1e4]], dtype=dtype, requires_grad=True)
    router_logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [0.0, 0.0], [-1e4, 1e4]], dtype=dtype, requires_grad=True)
    loss = mixture_bt_loss(margins, router_logits)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(margins.grad).all() and torch.isfinite(router_logits.grad).all()
    # Row 1 puts all weight on head 1, whose margin is -1e4: the loss is ~1e4, not inf.
    assert loss[1].item() == pytest.approx(1e4, rel=1e-2)


def test_margin_shifts_every_head():
    margins, router_logits = torch.randn(8, 3), torch.randn(8, 3)
    shift = torch.full((8,), 0.5)
    torch.testing.assert_close(
        mixture_bt_loss(margins, router_logits, shift), mixture_bt_loss(margins - 0.5, router_logits)
    )


def test_ensemble_loss_is_mean_of_per_head_bt():
    margins = torch.randn(10, 4)
    expected = -torch.nn.functional.logsigmoid(margins).mean(dim=-1)
    torch.testing.assert_close(ensemble_bt_loss(margins), expected)


def test_regularizers_are_zero_at_optimum_and_positive_on_collapse():
    uniform = torch.full((6, 4), 0.25)
    collapsed = torch.zeros(6, 4)
    collapsed[:, 2] = 1.0
    assert balance_penalty(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert balance_penalty(collapsed).item() == pytest.approx(math.log(4), rel=1e-4)
    assert entropy_penalty(uniform).item() == pytest.approx(0.0, abs=1e-6)
    # Confident but balanced routing (each prompt one head, every head used) is not a collapse.
    confident = torch.eye(4).repeat(2, 1)
    assert balance_penalty(confident).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy_penalty(confident).item() == pytest.approx(math.log(4), rel=1e-4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must match"):
        mixture_bt_loss(torch.randn(4, 3), torch.randn(4, 2))


def direct_context_nll(margins, router_logits, context_index):
    """-(1/n_c) log sum_k mean_i w_ik(c) prod_i sigmoid(delta_ik), per context, in float64 without logs until the end."""
    weights = torch.softmax(router_logits.double(), dim=-1)
    likelihoods = torch.sigmoid(margins.double())
    losses = []
    for context in sorted(set(context_index.tolist())):
        rows = context_index == context
        mean_weights = weights[rows].mean(dim=0)
        losses.append(-torch.log((mean_weights * likelihoods[rows].prod(dim=0)).sum()) / rows.sum())
    return torch.stack(losses)


def test_context_loss_equals_direct_computation():
    torch.manual_seed(0)
    margins, router_logits = torch.randn(24, 4) * 2, torch.randn(24, 4)
    context_index = torch.tensor([3, 0, 1] * 8)
    loss = context_mixture_bt_loss(margins, router_logits, context_index)
    assert loss.shape == (3,)
    torch.testing.assert_close(
        loss.double(), direct_context_nll(margins, router_logits, context_index), rtol=1e-5, atol=1e-6
    )
    shift = torch.full((24,), 0.5)
    torch.testing.assert_close(
        context_mixture_bt_loss(margins, router_logits, context_index, shift),
        context_mixture_bt_loss(margins - 0.5, router_logits, context_index),
    )


def test_context_loss_with_one_pair_per_context_is_the_mixture_loss():
    torch.manual_seed(1)
    margins, router_logits = torch.randn(10, 3) * 3, torch.randn(10, 3)
    loss = context_mixture_bt_loss(margins, router_logits, torch.arange(10))
    torch.testing.assert_close(loss, mixture_bt_loss(margins, router_logits))


def test_context_loss_prefers_one_head_per_context_to_one_head_per_pair():
    # Head 0 is right on pair 0 only, head 1 on pair 1 only: routing each pair to "its" head explains the pairs
    # perfectly under the per-pair mixture, but no single head explains the context.
    margins = torch.tensor([[8.0, -8.0], [-8.0, 8.0]])
    per_pair_routing = torch.tensor([[8.0, -8.0], [-8.0, 8.0]])
    same_context = torch.tensor([0, 0])
    assert mixture_bt_loss(margins, per_pair_routing).mean() < 0.01
    assert context_mixture_bt_loss(margins, per_pair_routing, same_context).item() > 3.5


def test_context_loss_is_finite_for_extreme_logits_and_checks_shapes():
    margins = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [3.0, 2.0]])
    loss = context_mixture_bt_loss(margins, torch.tensor([[1e4, -1e4]] * 3), torch.tensor([0, 0, 1]))
    assert torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="one context id per pair"):
        context_mixture_bt_loss(margins, margins, torch.tensor([0, 1]))
