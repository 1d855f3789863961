"""Importance-sampling correction for a sampler that is not bit-for-bit the trained model.

The completions are drawn from a sampling copy of the policy (generation/sampling_copy.py: LoRA merged into
bf16 weights), while the loss differentiates the trained model's own log-probs. The two differ a
little on most tokens and a lot on a few (measured on the demo: mean |difference| 0.005-0.03 nats,
single tokens up to 1.8, i.e. ratios up to 6). Treating those samples as exactly on-policy biases
the gradient, and over long runs such a mismatch is a known cause of collapse (Yao et al., 2025,
"Your efficient RL framework secretly brings you off-policy RL training"). TRL corrects it for
vLLM with `vllm_importance_sampling_correction`; this is the same computation, mode for mode:

- `token_truncate`: per-token ratio train/sampler clipped to [clip_min, clip_max] (TIS);
- `token_mask`: per-token ratios outside [clip_min, clip_max] set to 0;
- `sequence_truncate` / `sequence_mask`: one ratio per completion, exp of the summed log-ratio,
  clipped, or zeroed outside the bounds (TRL's default, with clip_max 3);
- `none`: no correction (the mismatch is still measured and logged).

The loss multiplies each token's policy-gradient term by its weight (grpo_loss's `is_weight`).
The sampler's log-probs are those of the distribution it drew from, after temperature, top-k and
top-p (vLLM's `processed_logprobs`). With top-k or top-p truncating that distribution the ratio
against the trained model's full-vocabulary log-probs is biased (every ratio sits below 1 by the
truncated mass), so config refuses a correction together with top_p < 1 or top_k > 0.

The ratio before any clipping or masking is logged too (`sampling/raw_importance_sampling_ratio/*`):
the clipped one alone hides how far apart the two models are.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Mode = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def importance_weights(
    train_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: Mode,
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """(weights, metrics): weights of shape (N, T) for token modes, (N, 1) for sequence modes, None for `none`.

    `train_logp` are the trained model's log-probs of the sampled tokens before this batch's
    updates (no gradient flows through them); `sampler_logp` the sampler's; `mask` is 1 on
    completion tokens. Metrics carry TRL's names.

    >>> w, m = importance_weights(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]),
    ...                           torch.ones(1, 2), "token_truncate", clip_max=1.5)
    >>> [round(x, 3) for x in w[0].tolist()], m["sampling/sampling_logp_difference/max"]
    ([1.5, 0.368], 1.0)
    """
    train_logp = train_logp.detach()
    keep = mask.bool()
    diff = ((train_logp - sampler_logp) * mask).nan_to_num(nan=0.0)
    delta = (train_logp - sampler_logp).abs()[keep & ~torch.isnan(sampler_logp)]
    metrics = {
        "sampling/sampling_logp_difference/mean": float(delta.mean()) if delta.numel() else 0.0,
        "sampling/sampling_logp_difference/max": float(delta.max()) if delta.numel() else 0.0,
    }
    sequence = mode.startswith("sequence")
    ratio = torch.exp(diff.sum(-1, keepdim=True) if sequence else diff)
    metrics |= _summary("sampling/raw_importance_sampling_ratio", ratio.flatten() if sequence else ratio[keep])
    if mode == "none":
        return None, metrics
    if mode.endswith("truncate"):
        if clip_min is not None or clip_max is not None:
            ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    elif mode.endswith("mask"):
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    else:
        raise ValueError(
            f"unknown sampling correction {mode!r}; choose none, token_truncate, token_mask, sequence_truncate or "
            "sequence_mask"
        )
    metrics |= _summary("sampling/importance_sampling_ratio", ratio.flatten() if sequence else ratio[keep])
    return ratio, metrics


def _summary(name: str, values: torch.Tensor) -> dict[str, float]:
    empty = values.numel() == 0  # as TRL: 0 when there is nothing to measure
    return {f"{name}/{stat}": 0.0 if empty else float(getattr(values, stat)()) for stat in ("min", "mean", "max")}
