"""The GRPO policy objectives (clipped, CISPO, SAPO) with an optional k3 KL penalty: pure functions on tensors.

Pure so that every variant can be checked against hand numbers and against TRL's own `_compute_loss`
on the same tensors (tests/test_trl_parity.py): the trainer only supplies log-probs, entropies and
advantages, and each knob here means exactly what the TRL option of the same name means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipelines.config import LOSS_TYPES, LossType

# The hard-clipped (PPO-style) objectives; cispo clips the weight instead, sapo gates it softly.
CLIPPED: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
# Normalised by completion tokens (of the whole batch); the others by sequences (loss_share agrees).
TOKEN_NORMALISED: tuple[str, ...] = ("bnpo", "dapo", "cispo")


@dataclass
class LossStats:
    kl: float
    # Shares of tokens (of sequences with a sequence-level ratio) outside the clip range that the
    # clipped objectives cut: 0 for cispo and sapo, which have no hard clip (TRL logs none for them).
    clip_low: float
    clip_high: float
    clip_region: float
    # cispo: share of tokens whose weight was capped at eps_max with a positive advantage (TRL's cispo_clip_ratio).
    cispo_clip: float | None = None
    # With an entropy bonus: the loss before the bonus (TRL's policy_loss) and the mean entropy it rewarded.
    policy_loss: float | None = None
    entropy_bonus: float | None = None


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def high_entropy_mask(
    entropy: torch.Tensor, mask: torch.Tensor, quantile: float, pool: torch.Tensor | None = None
) -> torch.Tensor:
    """Tokens whose entropy is in the top `quantile` (TRL's `get_high_entropy_mask`, "Beyond the 80/20 rule").

    The threshold is the (1 - quantile) quantile of `pool`, the entropies of every real token of the
    batch over all processes (default: those of `mask` here); a token is kept when its entropy is at
    least the threshold. Padding is never kept; an empty pool keeps nothing, as in TRL.

    >>> high_entropy_mask(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), torch.ones(1, 4), 0.5).tolist()
    [[False, True, False, True]]
    """
    real = mask.bool()
    pool = entropy.detach()[real] if pool is None else pool.detach().to(entropy.device)
    if pool.numel() == 0:
        return torch.zeros_like(real)
    threshold = torch.quantile(pool.float(), 1.0 - quantile)
    return ((entropy.detach() * mask) >= threshold) & real


def loss_settings(t: Any) -> dict[str, Any]:
    """`grpo_loss`'s knobs from the training config (`train`), built once per run: each means what
    the TRL option of the same name means (epsilon_high null = epsilon, as in TRL)."""
    return {
        "beta": t.beta,
        "epsilon_low": t.epsilon,
        "epsilon_high": t.epsilon if t.epsilon_high is None else t.epsilon_high,
        "loss_type": t.loss_type,
        "importance_sampling_level": t.importance_sampling_level,
        "max_completion_length": t.max_completion_length,
        "delta": t.delta,
        "top_entropy_quantile": t.top_entropy_quantile,
        "entropy_coef": t.entropy_coef,
        "sapo_temperature_pos": t.sapo_temperature_pos,
        "sapo_temperature_neg": t.sapo_temperature_neg,
    }


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
    delta: float | None = None,
    entropy: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
    entropy_pool: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
) -> tuple[torch.Tensor, LossStats]:
    """Loss for one micro-batch of completions, term for term TRL's `GRPOTrainer._compute_loss`.

    Shapes: `logp`, `old_logp`, `ref_logp`, `mask`, `entropy` are (sequences, tokens); `advantages`
    is (sequences,). The importance ratio `r = exp(logp - old_logp)` is per token, or per sequence
    (GSPO: exp of the mean log-ratio). Each token's policy term is `loss_type`'s (_policy_term), then
    weighted, then the k3 KL term added, then aggregated as `loss_type` says (_aggregate):

    - `top_entropy_quantile` < 1 keeps the policy term only on the tokens whose `entropy` is in that
      top quantile of `entropy_pool` (high_entropy_mask); the KL term stays on every token, as in TRL.
    - `is_weight` ((sequences, tokens) or (sequences, 1), no gradient) multiplies each token's policy
      term: the sampler correction of sampling_correction.py, where TRL applies its
      `importance_sampling_ratio`.
    - `beta` adds `beta` x the k3 estimator `exp(d) - d - 1` with `d = ref_logp - logp`.
    - `entropy_coef` subtracts a bonus for the entropy of the tokens the policy term acts on
      (_with_entropy_bonus).
    """
    mask = mask.to(logp.dtype)
    adv = advantages.unsqueeze(-1)
    ratio = torch.exp(_log_ratio(logp, old_logp, mask, importance_sampling_level))
    # (the ratio comes back capped at `delta` where the objective caps it: the clip shares count that one, as TRL's)
    per_token, ratio = _policy_term(
        ratio, adv, logp, loss_type, epsilon_low, epsilon_high, delta, sapo_temperature_pos, sapo_temperature_neg
    )
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        if entropy is None:
            raise ValueError("top_entropy_quantile < 1 needs the token entropies")
        entropy_mask = high_entropy_mask(entropy, mask, top_entropy_quantile, entropy_pool).to(logp.dtype)
        per_token = per_token * entropy_mask
    if is_weight is not None:
        per_token = per_token * is_weight.detach()
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    loss = _aggregate(per_token, mask, loss_type, max_completion_length, num_items_in_batch)
    policy_loss = bonus = None
    if entropy_coef != 0.0:
        loss, policy_loss, bonus = _with_entropy_bonus(loss, logp, entropy, mask, entropy_mask, entropy_coef)
    stats = _stats(ratio, adv, kl, mask, loss_type, epsilon_low, epsilon_high)
    stats.policy_loss, stats.entropy_bonus = policy_loss, bonus
    return loss, stats


def _log_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: Literal["token", "sequence"]
) -> torch.Tensor:
    """The log importance ratio per token, or per sequence (GSPO: the mean over its tokens, shape (sequences, 1))."""
    log_r = logp - old_logp
    if level == "sequence":
        return ((log_r * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    if level != "token":
        raise ValueError(f"unknown importance_sampling_level {level!r}; choose token or sequence")
    return log_r


def _policy_term(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    logp: torch.Tensor,
    loss_type: LossType,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's policy-gradient term, and the ratio it used (capped at `delta` where it is):

    - `grpo`, `bnpo`, `dr_grpo`, `dapo`: PPO's clipped objective `-min(r A, clip(r, 1 - epsilon_low,
      1 + epsilon_high) A)`; with `delta`, `r` in the first term is also capped at `delta`, which
      bounds the loss of a token with negative advantage whose ratio ran away (two-sided clipping,
      INTELLECT-2). `delta` is ignored by the other two types, as in TRL.
    - `cispo` (MiniMax-M1): `-sg(min(r, epsilon_high)) A logp`: the weight is capped (at eps_max =
      `epsilon_high`, recommended 5.0, not 1 + epsilon_high) and detached, so every token keeps a
      gradient, which the clipped objective takes from tokens outside the range.
    - `sapo` (Soft Adaptive Policy Optimization): `-(4 / tau) sigmoid(tau (r - 1)) A`, a smooth gate
      instead of a hard clip, `tau = sapo_temperature_pos` where A > 0, else `sapo_temperature_neg`.
    """
    if loss_type in CLIPPED:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            ratio = torch.clamp(ratio, max=delta)
        return -torch.min(ratio * adv, clipped * adv), ratio
    if loss_type == "cispo":
        return -torch.clamp(ratio, max=epsilon_high).detach() * adv * logp, ratio
    if loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv, ratio
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def _aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: LossType,
    max_completion_length: int | None,
    num_items_in_batch: float | None,
) -> torch.Tensor:
    """The micro-batch's loss from its per-token terms: `grpo` and `sapo` mean over sequences of
    per-sequence token means; `bnpo` token mean over the micro-batch; `dr_grpo` token sum /
    (sequences x max length); `dapo` and `cispo` token sum / tokens of the whole batch
    (`num_items_in_batch`, default: this micro-batch)."""
    # An empty slice (a process that kept no group this step) has loss 0, not 0/0: see distributed.py.
    sequences = max(mask.size(0), 1)
    if loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / sequences
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = max_completion_length or mask.size(-1)
        return (per_token * mask).sum() / (sequences * length)
    # dapo, cispo
    denominator = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1.0)
    return (per_token * mask).sum() / denominator


def _with_entropy_bonus(
    loss: torch.Tensor,
    logp: torch.Tensor,
    entropy: torch.Tensor | None,
    mask: torch.Tensor,
    entropy_mask: torch.Tensor | None,
    entropy_coef: float,
) -> tuple[torch.Tensor, float, float]:
    """`loss` - coef x the mean entropy of the tokens the policy term acts on (TRL's static bonus, the
    same for every loss type); also the loss before the bonus and that mean entropy.

    The bonus needs `entropy` with a gradient to do anything, so a differentiable `logp` with a
    detached `entropy` is refused rather than silently inert."""
    if entropy is None:
        raise ValueError("entropy_coef != 0 needs the token entropies")
    if logp.requires_grad and not entropy.requires_grad:
        raise ValueError(
            "entropy_coef != 0 needs token entropies with a gradient, and these are detached (the log-prob "
            "pass returns them as a metric), so the bonus would not move the policy; set train.entropy_coef=0"
        )
    acting = mask if entropy_mask is None else mask * entropy_mask
    mean_entropy = (entropy * acting).sum() / acting.sum().clamp(min=1.0)
    return loss - entropy_coef * mean_entropy, float(loss.detach()), float(mean_entropy.detach())


def _stats(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    loss_type: LossType,
    epsilon_low: float,
    epsilon_high: float,
) -> LossStats:
    """The mean KL and the clip shares (per token, or per sequence when the ratio is one per
    sequence, as TRL counts them)."""
    with torch.no_grad():
        weight = mask if ratio.size(-1) == mask.size(-1) else torch.ones_like(ratio)
        zero = torch.zeros_like(ratio)
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype) if loss_type in CLIPPED else zero
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype) if loss_type in CLIPPED else zero
        return LossStats(
            kl=_masked_mean(kl, mask),
            clip_low=_masked_mean(low, weight),
            clip_high=_masked_mean(high, weight),
            clip_region=_masked_mean(torch.clamp(low + high, max=1.0), weight),
            cispo_clip=(
                _masked_mean(((ratio > epsilon_high) & (adv > 0)).to(mask.dtype), weight)
                if loss_type == "cispo"
                else None
            ),
        )
