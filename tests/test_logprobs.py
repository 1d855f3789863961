"""Block-wise chosen-token log-probabilities against the plain log-softmax, values and gradients."""

from __future__ import annotations

import pytest
import torch

from pipelines.grpo import logprobs
from pipelines.grpo.logprobs import selected_logps


def plain(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    logps = torch.log_softmax(logits.double() / temperature, dim=-1)
    chosen = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return chosen, -(logps.exp() * logps).sum(-1)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 rows of a 50-token vocabulary, so 10 rows take four blocks, the last one short."""
    monkeypatch.setattr(logprobs, "BLOCK_BYTES", 3 * 4 * 50)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_equal_the_plain_log_softmax(small_blocks, temperature, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 50) * 4).to(dtype)
    targets = torch.randint(0, 50, (2, 5))
    weights = torch.randn(2, 5, dtype=torch.float64)

    x = logits.clone().requires_grad_()
    chosen, entropy = selected_logps(x, targets, temperature, with_entropy=True)
    (chosen.double() * weights).sum().backward()
    y = logits.double().clone().requires_grad_()
    want_chosen, want_entropy = plain(y, targets, temperature)
    (want_chosen * weights).sum().backward()

    assert chosen.dtype == torch.promote_types(dtype, torch.float32) and chosen.shape == targets.shape
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(chosen.double(), want_chosen.detach(), **tol)
    torch.testing.assert_close(entropy.double(), want_entropy.detach(), **tol)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), y.grad, **tol)


def test_gradcheck_in_float64(small_blocks):
    torch.manual_seed(1)
    logits = torch.randn(7, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    assert torch.autograd.gradcheck(lambda x: selected_logps(x, targets, 0.8)[0], (logits,))


def test_bf16_logits_are_as_close_to_exact_as_the_plain_way():
    """Under autocast the LM head gives bf16 logits; the gradient goes back in bf16 either way."""
    torch.manual_seed(2)
    logits = (torch.randn(40, 1000) * 8).bfloat16()
    targets = logits.float().argmax(-1)  # sampled tokens are often the most likely ones
    targets[::4] = torch.randint(0, 1000, (10,))
    weights = torch.randn(40)

    def grad(fn, dtype):
        x = logits.to(dtype).clone().requires_grad_()
        chosen = fn(x)
        (chosen * weights.to(chosen.dtype)).sum().backward()
        return chosen.detach().double(), x.grad.double()

    exact_chosen, exact_grad = grad(lambda x: plain(x, targets)[0], torch.float64)
    _, old_grad = grad(lambda x: torch.log_softmax(x.float(), -1).gather(-1, targets[:, None])[:, 0], torch.bfloat16)
    new_chosen, new_grad = grad(lambda x: selected_logps(x, targets)[0], torch.bfloat16)
    assert new_grad.shape == exact_grad.shape
    torch.testing.assert_close(new_chosen, exact_chosen, atol=1e-5, rtol=1e-5)

    def error(g):
        return ((g - exact_grad).norm() / exact_grad.norm()).item()

    assert error(new_grad) <= 1.01 * error(old_grad) + 1e-12
    assert error(new_grad) < 5e-3  # bf16 rounding of the gradient, nothing more


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_gradient_equals_autograd_and_entropy_is_skipped_unless_asked(small_blocks, temperature):
    """The entropy bonus (train.entropy_coef) trains through this gradient; unused, it costs nothing."""
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 50, dtype=torch.float64) * 3
    targets = torch.randint(0, 50, (3, 4))
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    chosen, entropy = selected_logps(x, targets, temperature, with_entropy=True)
    ((chosen * a).sum() + (entropy * b).sum()).backward()
    y = logits.clone().requires_grad_()
    want_chosen, want_entropy = plain(y, targets, temperature)
    ((want_chosen * a).sum() + (want_entropy * b).sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-7)
    assert (entropy >= 0).all() and (entropy <= torch.log(torch.tensor(50.0)) + 1e-5).all()
    assert selected_logps(x, targets)[1] is None


def test_runs_under_bf16_autocast_in_fp32():
    torch.manual_seed(3)
    logits = torch.randn(6, 50)
    targets = torch.randint(0, 50, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chosen, entropy = selected_logps(logits, targets, with_entropy=True)
    want_chosen, want_entropy = plain(logits, targets)
    assert chosen.dtype == torch.float32
    torch.testing.assert_close(chosen.double(), want_chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), want_entropy, atol=1e-5, rtol=1e-5)
