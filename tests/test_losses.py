import math

import pytest
import torch

from trl_micro.losses import balance_penalty, ensemble_bt_loss, entropy_penalty, mixture_bt_loss


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
    torch.testing.assert_close(mixture_bt_loss(margins, router_logits, shift), mixture_bt_loss(margins - 0.5, router_logits))


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
