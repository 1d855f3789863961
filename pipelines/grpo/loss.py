"""The clipped GRPO objective with an optional k3 KL penalty: a pure function on tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]


@dataclass
class LossStats:
    kl: float
    clip_low: float
    clip_high: float
    clip_region: float


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: LossType = "grpo",
    importance_sampling_level: Literal["token", "sequence"] = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """Loss for one micro-batch of completions.

    Shapes: `logp`, `old_logp`, `ref_logp`, `mask` are (sequences, tokens); `advantages` is
    (sequences,). The ratio `exp(logp - old_logp)` is clipped to [1 - epsilon_low, 1 + epsilon_high]
    per token, or per sequence (GSPO: exp of the mean log-ratio). The KL term is the k3 estimator
    `exp(d) - d - 1` with `d = ref_logp - logp`.

    Aggregation (`loss_type`): `grpo` mean over sequences of per-sequence token means;
    `bnpo` token mean over the micro-batch; `dr_grpo` token sum / (sequences x max length);
    `dapo` token sum / tokens of the whole batch (`num_items_in_batch`, default: this micro-batch).

    `is_weight` ((sequences, tokens) or (sequences, 1), no gradient) multiplies each token's
    policy-gradient term before the KL term is added: the sampler correction of
    sampling_correction.py, applied where TRL applies its `importance_sampling_ratio`.
    """
    mask = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(-1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if is_weight is not None:
        per_token = per_token * is_weight.detach()
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = max_completion_length or logp.size(-1)
        loss = (per_token * mask).sum() / (logp.size(0) * length)
    elif loss_type == "dapo":
        denominator = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1.0)
        loss = (per_token * mask).sum() / denominator
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose grpo, bnpo, dr_grpo or dapo")

    with torch.no_grad():
        # Clip shares are per token, or per sequence when the ratio is one per sequence (as TRL counts).
        weight = mask if ratio.size(-1) == mask.size(-1) else torch.ones_like(ratio)
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(logp.dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(logp.dtype)
        stats = LossStats(
            kl=_masked_mean(kl, mask),
            clip_low=_masked_mean(low, weight),
            clip_high=_masked_mean(high, weight),
            clip_region=_masked_mean(torch.clamp(low + high, max=1.0), weight),
        )
    return loss, stats
