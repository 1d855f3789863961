"""A lean sampling loop for small models on CPU: one prefill per distinct prompt, a shared KV cache.

`model.generate` re-runs the prompt for every completion of a group and spends a few milliseconds
of bookkeeping per token; at 135M parameters on 2 cores that bookkeeping is a large share of the
step. This loop prefills each prompt once, copies its KV cache to the G completions of its group
(`batch_repeat_interleave`), and does only what sampling needs per token: temperature, top-k,
top-p, EOS tracking.
"""

from __future__ import annotations

from typing import Any

import torch


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering, as `transformers` orders them.

    >>> filter_logits(torch.tensor([[1.0, 2.0, 3.0]]), 1.0, 2, 1.0).isinf().tolist()
    [[True, False, False]]
    """
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_generations: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """(B * G, T) completion ids for left-padded prompts, padded with `pad_id` after EOS."""
    from transformers import DynamicCache

    cache = DynamicCache()
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    if num_generations > 1:
        cache.batch_repeat_interleave(num_generations)
        attention_mask = attention_mask.repeat_interleave(num_generations, dim=0)
        positions = positions.repeat_interleave(num_generations, dim=0)
    logits = out.logits[:, -1, :].float().repeat_interleave(num_generations, dim=0)
    next_position = positions[:, -1:] + 1
    done = torch.zeros(logits.size(0), dtype=torch.bool)
    tokens: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        if do_sample:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            # argmax(p / Exp(1)) draws from p exactly (the exponential race), and is much cheaper
            # than torch.multinomial over a 49k vocabulary on CPU.
            token = (probs / torch.empty_like(probs).exponential_()).argmax(-1)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        done |= token == eos_id
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position, cache=cache, use_cache=True)
        next_position = next_position + 1
        logits = out.logits[:, -1, :].float()
    return torch.stack(tokens, dim=1)
