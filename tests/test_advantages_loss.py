"""Advantage and loss numbers, checked against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.grpo.advantages import advantages_from_rewards, combine_rewards, group_advantages
from pipelines.grpo.loss import grpo_loss, high_entropy_mask


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
    unscored = combine_rewards(torch.tensor([[float("nan"), float("nan")]]), torch.tensor([1.0, 0.2]))
    assert math.isnan(float(unscored))  # not scored, not 0


NAN = float("nan")
# The measurement: 2 reward functions, one group of 4; the last completion no function scored.
MEASURED = torch.tensor([[1.0, 1.0], [1.0, NAN], [0.0, 0.0], [NAN, NAN]])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_unscored_completion_is_left_out_of_its_group(scale):
    """TRL 1.16 gives [1.00, 0.00, -1.00, 0.00] here (grpo_trainer.py, _generate_and_score_completions:
    `unscorable_mask` rows are NaN in the nan-aware mean and std, then `nan_to_num(advantages, nan=0.0)`);
    counting the unscored completion as 0 gave [1.31, 0.26, -0.78, -0.78]. tests/test_trl_parity.py
    checks the same against TRL's own code for both aggregations and every scale."""
    adv, rewards, std = advantages_from_rewards(MEASURED, torch.tensor([1.0, 1.0]), 4, scale)
    # Scored sums 2, 1, 0: mean 1, unbiased std 1 (one group, so the batch's std is the group's).
    divisor = 1.0 if scale == "none" else 1.0 + 1e-4
    assert adv.tolist() == pytest.approx([1 / divisor, 0.0, -1 / divisor, 0.0])
    assert rewards[:3].tolist() == [2.0, 1.0, 0.0] and math.isnan(rewards[3])
    assert std.tolist() == pytest.approx([1.0])


def test_unscored_completion_normalize_then_sum_by_hand():
    adv, _, _ = advantages_from_rewards(MEASURED, torch.tensor([1.0, 1.0]), 4, aggregation="normalize_then_sum")
    # f1 scored 1, 1, 0: mean 2/3, std sqrt(1/3); f2 scored 1, 0: mean 1/2, std sqrt(1/2).
    f1 = torch.tensor([1 / 3, 1 / 3, -2 / 3]) / (math.sqrt(1 / 3) + 1e-4)
    f2 = torch.tensor([0.5, -0.5]) / (math.sqrt(0.5) + 1e-4)
    summed = torch.tensor([f1[0] + f2[0], f1[1], f1[2] + f2[1]])  # the second has no f2: it adds nothing
    expected = (summed - summed.mean()) / (summed.std() + 1e-4)
    assert adv.tolist() == pytest.approx([*expected.tolist(), 0.0], abs=1e-6)


def test_a_group_with_one_or_no_scored_completion_has_no_signal():
    per_fn = torch.tensor([[1.0], [NAN], [NAN], [NAN], [NAN], [NAN], [NAN], [NAN], [3.0], [1.0], [NAN], [2.0]])
    adv, _, std = advantages_from_rewards(per_fn, torch.tensor([1.0]), 4)
    assert adv[:8].tolist() == [0.0] * 8 and torch.isfinite(adv).all()
    assert std[0] == 0 and math.isnan(std[1])  # (batch.py counts both groups as flat: NaN > 1e-6 is False)
    assert adv[8:].tolist() == pytest.approx([1 / 1.0001, -1 / 1.0001, 0.0, 0.0])


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


def test_two_sided_clipping_caps_negative_advantage_ratios():
    logp, old = torch.zeros(1, 2), torch.log(torch.tensor([[1 / 3.0, 1 / 0.5]]))  # ratios 3 and 0.5
    # A < 0: -min(-r, -clip(r)) = max(r, clip(r)): 3 and 0.8 without delta; with delta 2, 3 -> 2.
    loss, _ = grpo_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), epsilon_high=0.2)
    assert float(loss) == pytest.approx((3 + 0.8) / 2)
    capped, stats = grpo_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), epsilon_high=0.2, delta=2.0)
    assert float(capped) == pytest.approx((2 + 0.8) / 2)
    assert stats.clip_low == pytest.approx(0.5) and stats.clip_high == 0.0  # the 0.5 ratio, below 1 - epsilon
    # A > 0 is untouched: min(r, clip(r)) already caps at 1 + epsilon_high.
    pos, _ = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), epsilon_high=0.2, delta=2.0)
    assert float(pos) == pytest.approx(-(1.2 + 0.5) / 2)


def test_cispo_caps_and_detaches_the_weight():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    old = logp.detach() - torch.log(torch.tensor([[3.0, 0.5]]))  # ratios 3 and 0.5
    loss, stats = grpo_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 2), epsilon_high=1.5, loss_type="cispo")
    # weights min(3, 1.5) = 1.5 and 0.5, no gradient through them: loss -sum(w A logp) / 2 tokens
    assert float(loss) == pytest.approx(-(1.5 * 2 * math.log(0.5) + 0.5 * 2 * math.log(0.25)) / 2)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-1.5 * 2 / 2, -0.5 * 2 / 2])  # the capped token still learns
    assert stats.cispo_clip == pytest.approx(0.5) and stats.clip_region == 0.0


def test_sapo_soft_gate_on_policy():
    # At ratio 1 the gate is (4 / tau) sigmoid(0) = 2 / tau, and its slope 4 sigmoid'(0) = 1: the
    # gradient is plain -A, as for grpo; tau = 1 where A > 0, 1.05 elsewhere (TRL's defaults).
    logp, loss, _ = _on_policy("sapo")
    assert float(loss) == pytest.approx((-2 * 1.0 + 2 / 1.05 * 2.0) / 2)
    loss.backward()
    expected = torch.tensor([[-1 / 2 / 2, -1 / 2 / 2, 0.0], [2 / 3 / 2, 2 / 3 / 2, 2 / 3 / 2]])
    assert torch.allclose(logp.grad, expected)


def test_high_entropy_mask_keeps_the_top_quantile():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.8, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    # real tokens 0.1 0.3 0.5 0.7 0.8 0.9: the 0.5 quantile is 0.6; padding never counts
    assert high_entropy_mask(entropy, mask, 0.5).tolist() == [[False, True, False, True], [False, True, False, False]]
    pooled = high_entropy_mask(entropy, mask, 0.5, pool=torch.tensor([0.0, 0.85, 0.95]))  # other ranks' tokens
    assert pooled.tolist() == [[False, True, False, False], [False, False, False, False]]
    assert not high_entropy_mask(entropy, torch.zeros_like(mask), 0.5).any()


def test_top_entropy_quantile_trains_only_high_entropy_tokens():
    logp = torch.zeros(1, 4, requires_grad=True)
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    loss, _ = grpo_loss(
        logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 4), entropy=entropy, top_entropy_quantile=0.5
    )
    loss.backward()
    assert logp.grad.tolist() == [[0.0, -0.25, 0.0, -0.25]]  # the normaliser still counts every token


def test_entropy_bonus_is_a_mean_entropy_with_its_own_gradient():
    logp = torch.zeros(2, 2, requires_grad=True)
    entropy = torch.tensor([[1.0, 2.0], [3.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = grpo_loss(logp, logp.detach(), torch.zeros(2), mask, entropy=entropy, entropy_coef=0.1)
    assert stats.entropy_bonus == pytest.approx(2.0) and stats.policy_loss == 0.0
    assert float(loss) == pytest.approx(-0.1 * 2.0)
    loss.backward()
    assert entropy.grad.flatten().tolist() == pytest.approx([-0.1 / 3, -0.1 / 3, -0.1 / 3, 0.0])


def test_entropy_bonus_refuses_detached_entropies():
    logp = torch.zeros(1, 2, requires_grad=True)
    with pytest.raises(ValueError, match="entropies with a gradient"):
        grpo_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), entropy=torch.ones(1, 2), entropy_coef=0.1)
    with pytest.raises(ValueError, match="needs the token entropies"):
        grpo_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), top_entropy_quantile=0.5)
