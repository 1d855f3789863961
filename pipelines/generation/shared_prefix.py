"""Decoding G completions of a prompt against one copy of the prompt's keys and values.

A group's completions share their prompt, but a plain KV cache repeats the prompt's keys and values
for every completion (`batch_repeat_interleave`): with G = 8 each decoded token reads, and each
cache append copies, eight copies of the prompt. This module keeps the prompt's keys and values
once per group (the prefix) and the completions' own in an ordinary cache (the suffix), and
attends to both: the scores against the prefix are one batched matmul per group, with the group's
completions as that matmul's rows, the scores against the suffix one per completion, and a single
softmax runs over both (Hydragen's / FlashInfer's cascade attention, written in plain torch ops).

It plugs into transformers through its public extension point: an attention function registered
with `AttentionInterface` (and `sdpa`'s mask function under the same name), set on the sampling
copy only. Without the `shared_prefix` keyword argument (prefill, `model.generate`, scoring) the
function is exactly transformers' `sdpa`. Measured on 2 cores in bf16 (bench/decode.py, numbers in
bench/RESULTS.md): 1.2-1.4x faster decoding for 2-16 prompts x 8 completions of 48 tokens after an
83-token prompt, 1.5-2.2x after a 339-token one; the prompt's cache takes 1/G of the memory.

Only decoder layers with plain full attention can use it (no sliding window, no logit
soft-capping); `enable` leaves other models on the repeated cache, which is always correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NAME = "grpo_shared_prefix"
# Model families whose attention goes through transformers' AttentionInterface with a plain causal
# softmax (checked by tests/test_shared_prefix.py against the repeated cache).
SUPPORTED = {"llama", "qwen2", "qwen3"}
_registered = False


def enable(model: Any) -> bool:
    """Switch `model` (a private sampling copy) to shared-prefix decoding if its architecture allows."""
    global _registered
    config = model.config
    plain_full_attention = (
        config.model_type in SUPPORTED
        and not getattr(config, "use_sliding_window", False)
        and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ["full_attention"])
        and getattr(config, "attn_logit_softcapping", None) is None
        and config._attn_implementation in ("sdpa", "eager", NAME)
    )
    if not plain_full_attention:
        return False
    if not _registered:  # registered on first use, not at import: no import-time side effects
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # prefill and generate() get sdpa's masks
        _registered = True
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME


def enabled(model: Any) -> bool:
    return getattr(model.config, "_attn_implementation", None) == NAME


@dataclass
class Prefix:
    """The prompts' keys and values once per group, and which group each active completion is in."""

    keys: list[torch.Tensor]  # per layer: (prompts, kv heads, prompt length, head dim)
    values: list[torch.Tensor]
    padding: torch.Tensor  # (prompts, prompt length) bool: left padding, never attended to
    group: torch.Tensor = None  # type: ignore[assignment]  # (active rows,) the prompt of each row
    slot: torch.Tensor = None  # type: ignore[assignment]  # (active rows,) its place among its group's active rows
    width: int = 0  # most active rows of any one group
    row_padding: torch.Tensor = None  # type: ignore[assignment]  # (active rows, 1, 1, prompt length)

    @classmethod
    def from_cache(cls, cache: Any, attention_mask: torch.Tensor, num_generations: int) -> Prefix:
        prefix = cls(
            [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], attention_mask == 0
        )
        prefix.select(
            torch.arange(attention_mask.size(0), device=attention_mask.device).repeat_interleave(num_generations)
        )
        return prefix

    def select(self, group: torch.Tensor) -> None:
        """Set the active rows (given by their groups, in row order, group after group)."""
        counts = torch.bincount(group, minlength=self.padding.size(0))
        self.group = group
        self.slot = torch.arange(group.numel(), device=group.device) - (counts.cumsum(0) - counts)[group]
        self.width = int(counts.max())
        self.row_padding = self.padding[group][:, None, None, :]


def attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (batch, q_len, heads, head dim) out, no weights.

    With `shared_prefix` (one query token per active row; `key`/`value` are the rows' own suffix
    cache), softmax over [prefix scores, suffix scores]; without it, `sdpa`.
    """
    prefix: Prefix | None = kwargs.pop("shared_prefix", None)
    if prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, _, dim = query.shape
    kv_heads = key.size(1)
    per_kv = heads // kv_heads  # grouped-query attention: query heads sharing one key/value head
    keys, values = prefix.keys[module.layer_idx], prefix.values[module.layer_idx]
    prompts, _, length, _ = keys.shape
    group, slot, width = prefix.group, prefix.slot, prefix.width
    q = query.view(rows, kv_heads, per_kv, dim)

    def to_groups(x: torch.Tensor) -> torch.Tensor:
        """(rows, kv, per_kv, n) -> (prompts, kv, width * per_kv, n), empty slots zero: one scatter, no permute."""
        out = x.new_zeros(prompts, kv_heads, width, per_kv, x.size(-1))
        out[group, :, slot] = x
        return out.view(prompts, kv_heads, width * per_kv, x.size(-1))

    def to_rows(x: torch.Tensor) -> torch.Tensor:
        """The inverse of to_groups for the occupied slots: one gather."""
        return x.view(prompts, kv_heads, width, per_kv, x.size(-1))[group, :, slot]

    scale = dim**-0.5 if scaling is None else scaling
    scores = torch.cat([to_rows(to_groups(q) @ keys.transpose(-1, -2)), q @ key.transpose(-1, -2)], dim=-1)
    scores = scores.float() * scale  # softmax in fp32, as transformers' eager attention does
    scores[..., :length].masked_fill_(prefix.row_padding, float("-inf"))
    weights = scores.softmax(-1).to(query.dtype)
    out = to_rows(to_groups(weights[..., :length]) @ values) + weights[..., length:] @ value
    return out.reshape(rows, 1, heads, dim), None
