"""The sampler's log-probs and the importance-sampling correction for sampler/trainer mismatch."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.grpo.loss import grpo_loss
from pipelines.grpo.sampling_correction import importance_weights

TRAIN = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, -1.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, -9.0], [-0.2, -1.0, -1.5]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0's third token is after EOS


def test_token_modes_by_hand():
    truncated, m = importance_weights(TRAIN, SAMPLER, MASK, "token_truncate", clip_max=1.5)
    # exp(train - sampler) clipped at 1.5; the masked token gets exp(0) = 1 (the loss masks it anyway)
    assert truncated.flatten().tolist() == pytest.approx([1.5, math.exp(-1.0), 1.0, 1.0, math.exp(-2.0), 1.5])
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx((0.5 + 1.0 + 0.0 + 2.0 + 0.5) / 5)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(2.0)  # the masked 8.5 is not counted
    assert m["sampling/importance_sampling_ratio/max"] == pytest.approx(1.5)
    assert m["sampling/importance_sampling_ratio/min"] == pytest.approx(math.exp(-2.0))

    # and the ratio before clipping: exp(0.5), exp(-1), 1, exp(-2), exp(0.5) over the five completion tokens
    assert m["sampling/raw_importance_sampling_ratio/max"] == pytest.approx(math.exp(0.5))
    assert m["sampling/raw_importance_sampling_ratio/min"] == pytest.approx(math.exp(-2.0))
    raw_mean = (2 * math.exp(0.5) + math.exp(-1.0) + 1.0 + math.exp(-2.0)) / 5
    assert m["sampling/raw_importance_sampling_ratio/mean"] == pytest.approx(raw_mean)

    masked, m = importance_weights(TRAIN, SAMPLER, MASK, "token_mask", clip_min=0.2, clip_max=1.5)
    assert masked.flatten().tolist() == pytest.approx([0.0, math.exp(-1.0), 1.0, 1.0, 0.0, 0.0])
    assert m["sampling/raw_importance_sampling_ratio/max"] == pytest.approx(math.exp(0.5))  # masked, not hidden


def test_sequence_modes_by_hand():
    # summed log-ratios over completion tokens: row 0: 0.5 - 1.0 = -0.5; row 1: 0 - 2.0 + 0.5 = -1.5
    truncated, m = importance_weights(TRAIN, SAMPLER, MASK, "sequence_truncate", clip_min=0.3, clip_max=3.0)
    assert truncated.shape == (2, 1)
    assert truncated.flatten().tolist() == pytest.approx([math.exp(-0.5), 0.3])
    masked, _ = importance_weights(TRAIN, SAMPLER, MASK, "sequence_mask", clip_min=0.3, clip_max=3.0)
    assert masked.flatten().tolist() == pytest.approx([math.exp(-0.5), 0.0])
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx((math.exp(-0.5) + 0.3) / 2)
    assert m["sampling/raw_importance_sampling_ratio/min"] == pytest.approx(math.exp(-1.5))  # one ratio a completion


def test_none_measures_without_weighting():
    weights, m = importance_weights(TRAIN, SAMPLER, MASK, "none")
    assert weights is None
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(2.0)
    assert "sampling/importance_sampling_ratio/mean" not in m
    assert m["sampling/raw_importance_sampling_ratio/max"] == pytest.approx(math.exp(0.5))  # measured all the same


@pytest.mark.parametrize("truncation", ["train.top_p=0.9", "train.top_k=50"])
def test_a_correction_under_top_p_or_top_k_is_refused(truncation):
    from pipelines import config

    with pytest.raises(config.ConfigError, match="truncated distribution .* set sampling_correction: none"):
        config.resolve({}, [truncation, "train.sampling_correction=token_truncate"])
    cfg = config.resolve({}, [truncation, "train.sampling_correction=none"])
    assert cfg.train.sampling_correction == "none"


def test_loss_weights_the_policy_term_not_the_kl_term():
    logp = TRAIN.clone().requires_grad_()
    adv = torch.tensor([1.0, -0.5])
    ref = TRAIN - 0.1
    w = torch.tensor([[2.0, 0.5, 1.0], [1.0, 0.0, 3.0]])
    weighted, _ = grpo_loss(logp, logp.detach(), adv, MASK, ref_logp=ref, beta=0.1, is_weight=w, loss_type="bnpo")
    # on-policy the policy term of token (i, t) is -A_i; with weights -A_i * w_it; KL is unweighted
    d = ref - TRAIN
    kl = torch.exp(d) - d - 1
    per_token = -adv.unsqueeze(-1) * w + 0.1 * kl
    assert float(weighted.detach()) == pytest.approx(float((per_token * MASK).sum() / MASK.sum()))
    (grad,) = torch.autograd.grad(weighted, logp)
    unweighted, _ = grpo_loss(logp, logp.detach(), adv, MASK, ref_logp=ref, beta=0.1, loss_type="bnpo")
    (grad_plain,) = torch.autograd.grad(unweighted, logp)
    assert grad[1, 1] != grad_plain[1, 1]  # weight 0 removed that token's policy gradient...
    assert float(grad[1, 1]) == pytest.approx(
        float(0.1 * (1 - torch.exp(d[1, 1])) / MASK.sum())
    )  # ...and kept its KL gradient


@pytest.mark.parametrize("backend", ["lean", "hf"])
def test_sampler_logps_are_the_sampled_distribution(tiny_reference, backend):
    """Each backend reports the log-prob its sampling distribution gave each token (after temperature);
    with the same fp32 model, token_logps at that temperature gives the same numbers."""
    from pipelines.generation.rollout import generate
    from pipelines.grpo.logprobs import token_logps
    from pipelines.snapshot.loading import load_reference

    model, tokenizer = load_reference(tiny_reference)
    prompts = ["What is 2 + 2?", "What is 7 * 8?"]
    rollout = generate(
        model,
        tokenizer,
        prompts,
        num_generations=3,
        max_new_tokens=8,
        do_sample=True,
        temperature=0.7,
        backend=backend,
        seeds=[1, 2],
    )
    assert rollout.sampler_logps is not None and rollout.sampler_logps.shape == rollout.completion_ids.shape
    mask = rollout.completion_mask.bool()
    assert (rollout.sampler_logps[~mask] == 0).all()
    with torch.no_grad():
        at_temperature, _ = token_logps(model, rollout, temperature=0.7)
        plain, _ = token_logps(model, rollout)
    assert torch.allclose(rollout.sampler_logps[mask], at_temperature[mask], atol=1e-4)
    assert not torch.allclose(rollout.sampler_logps[mask], plain[mask], atol=1e-3)  # the temperature matters


def test_top_k_sampler_logps_are_renormalised(tiny_reference):
    from pipelines.generation.rollout import generate
    from pipelines.grpo.logprobs import token_logps
    from pipelines.snapshot.loading import load_reference

    model, tokenizer = load_reference(tiny_reference)
    rollout = generate(
        model, tokenizer, ["What is 2 + 2?"], num_generations=4, max_new_tokens=6, do_sample=True, top_k=3, seeds=[5]
    )
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        full, _ = token_logps(model, rollout)
    # the top-3 distribution puts more mass on each kept token than the full one
    assert (rollout.sampler_logps[mask] >= full[mask] - 1e-5).all()
    assert (rollout.sampler_logps[mask] > full[mask] + 1e-3).any()


def test_greedy_decoding_reports_no_logps(tiny_reference):
    from pipelines.generation.rollout import generate
    from pipelines.snapshot.loading import load_reference

    model, tokenizer = load_reference(tiny_reference)
    assert (
        generate(
            model, tokenizer, ["What is 2 + 2?"], num_generations=1, max_new_tokens=4, do_sample=False
        ).sampler_logps
        is None
    )
