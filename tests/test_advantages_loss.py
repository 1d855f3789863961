"""Advantage and loss numbers, checked against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.grpo.advantages import combine_rewards, group_advantages
from pipelines.grpo.loss import grpo_loss


def test_group_advantages_by_hand():
    # Group 1: rewards 1,0,0,0 -> mean .25, unbiased std sqrt((.5625 + 3 * .0625) / 3) = .5
    # Group 2: all equal -> no signal.
    adv, std = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]), 4, "group")
    assert std.tolist() == pytest.approx([0.5, 0.0])
    assert adv.tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0])


def test_batch_and_no_scaling():
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    none, _ = group_advantages(rewards, 2, "none")
    assert none.tolist() == pytest.approx([0.5, -0.5, 1.0, -1.0])
    batch, _ = group_advantages(rewards, 2, "batch")
    batch_std = float(rewards.std())  # sqrt(((-.25)^2 + 1.25^2 + 1.75^2 + .25^2) / 3)
    assert batch_std == pytest.approx(math.sqrt((0.0625 + 1.5625 + 3.0625 + 0.0625) / 3))
    assert batch.tolist() == pytest.approx(
        [0.5 / (batch_std + 1e-4), -0.5 / (batch_std + 1e-4), 1 / (batch_std + 1e-4), -1 / (batch_std + 1e-4)]
    )


def test_groups_must_divide():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_combine_rewards_weights_and_none():
    per_fn = torch.tensor([[1.0, 1.0], [0.0, float("nan")], [1.0, 0.0]])
    assert combine_rewards(per_fn, torch.tensor([1.0, 0.2])).tolist() == pytest.approx([1.2, 0.0, 1.0])


# Two sequences: the first has 2 real tokens of 3, the second all 3.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADV = torch.tensor([1.0, -2.0])


def _on_policy(loss_type, **kw):
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.2, 0.4]])).requires_grad_()
    loss, stats = grpo_loss(logp, logp.detach(), ADV, MASK, loss_type=loss_type, **kw)
    return logp, loss, stats


def test_on_policy_loss_values_per_aggregation():
    # Ratio 1 everywhere, so every token's loss is -A: seq 1 tokens -1, seq 2 tokens +2.
    assert float(_on_policy("grpo")[1]) == pytest.approx((-1 + 2) / 2)  # mean of per-sequence means
    assert float(_on_policy("bnpo")[1]) == pytest.approx((-1 * 2 + 2 * 3) / 5)  # token mean
    assert float(_on_policy("dr_grpo", max_completion_length=4)[1]) == pytest.approx((-2 + 6) / (2 * 4))
    assert float(_on_policy("dapo", num_items_in_batch=10)[1]) == pytest.approx((-2 + 6) / 10)


def test_on_policy_gradient_is_advantage_weighted():
    logp, loss, _ = _on_policy("grpo")
    loss.backward()
    # d loss / d logp = -A / (tokens in sequence) / sequences, zero on padding.
    expected = torch.tensor([[-1 / 2 / 2, -1 / 2 / 2, 0.0], [2 / 3 / 2, 2 / 3 / 2, 2 / 3 / 2]])
    assert torch.allclose(logp.grad, expected)


def test_clipping_token_level():
    logp = torch.zeros(1, 2)
    old = torch.log(torch.tensor([[1 / 1.5, 1 / 0.5]]))  # ratios 1.5 and 0.5
    loss, stats = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), epsilon_low=0.2, epsilon_high=0.28)
    # A > 0: min(1.5, 1.28) = 1.28 and min(0.5, 0.8) = 0.5 -> tokens -1.28, -0.5
    assert float(loss) == pytest.approx(-(1.28 + 0.5) / 2)
    assert stats.clip_high == pytest.approx(0.5) and stats.clip_low == 0.0
    loss_neg, stats_neg = grpo_loss(
        logp, old, torch.tensor([-1.0]), torch.ones(1, 2), epsilon_low=0.2, epsilon_high=0.28
    )
    # A < 0: -min(-1.5, -1.28) = 1.5 and -min(-0.5, -0.8) = 0.8
    assert float(loss_neg) == pytest.approx((1.5 + 0.8) / 2)
    assert stats_neg.clip_low == pytest.approx(0.5) and stats_neg.clip_region == pytest.approx(0.5)


def test_sequence_level_ratio_is_exp_mean_log_ratio():
    logp = torch.zeros(1, 2)
    old = torch.tensor([[-math.log(1.1), -math.log(1.3)]])  # log-ratios log 1.1, log 1.3
    loss, _ = grpo_loss(
        logp, old, torch.tensor([1.0]), torch.ones(1, 2), importance_sampling_level="sequence", epsilon_high=0.5
    )
    ratio = math.exp((math.log(1.1) + math.log(1.3)) / 2)
    assert float(loss) == pytest.approx(-ratio)


def test_k3_kl_penalty():
    logp = torch.log(torch.tensor([[0.25]]))
    ref = torch.log(torch.tensor([[0.5]]))  # d = log 2 -> kl = 2 - log 2 - 1
    loss, stats = grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), ref_logp=ref, beta=0.1)
    assert stats.kl == pytest.approx(1 - math.log(2))
    assert float(loss) == pytest.approx(0.1 * (1 - math.log(2)))


def test_beta_needs_reference():
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), beta=0.1)
