"""Each episode's KV cache kept between its turns (multi-turn rollouts on the lean backend).

A later turn of an episode reads its whole context: the prompt, its earlier turns and the tool's
reply. Prefilling that again for every episode at every turn makes sampling several times dearer
than one turn of as many tokens. The lean loop instead hands back each row's keys and values as
the row finishes (`lean_decode.RowCache`), and the next turn starts from them: only what is new
since (the end-of-turn token the model wrote, the tool's reply and the assistant's header) runs
through the model, then decoding goes on as usual.
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.generation.lean_decode import Decoding, RowCache, cache_kwargs, last_positions


@torch.no_grad()
def resume(model: Any, rows: list[RowCache], new_tokens: list[list[int]], pad_id: int) -> Decoding:
    """Rows' kept caches, right-aligned in one batch (left padding masked), with each row's new
    tokens run after it (left-padded between the two, as `lean_decode.prefill` pads an opening): the
    decoding state from which their next turn is sampled."""
    from transformers import DynamicCache

    device = rows[0].mask.device
    length = max(r.mask.numel() for r in rows)
    width = max(len(t) for t in new_tokens)
    layers = []
    for n in range(len(rows[0].keys)):
        keys, values = (_right_aligned([getattr(r, part)[n] for r in rows], length) for part in ("keys", "values"))
        layers.append((keys, values))
    cache = DynamicCache(layers)
    mask = torch.zeros((len(rows), length + width), dtype=torch.long, device=device)
    run = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for i, (row, tokens) in enumerate(zip(rows, new_tokens, strict=True)):
        mask[i, length - row.mask.numel() : length] = row.mask
        mask[i, length + width - len(tokens) :] = 1
        run[i, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=run,
        attention_mask=mask,
        position_ids=positions[:, -width:],
        **cache_kwargs(model, cache),
        use_cache=True,
        logits_to_keep=last_positions(width, device=device),
    )
    return Decoding(cache, None, mask, positions[:, -1:] + 1, out.logits[:, -1, :].float())


def _right_aligned(parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """(kv heads, n_i, dim) tensors -> (rows, kv heads, length, dim), each at the right end (zeros
    on the left, where the mask is 0)."""
    heads, _, dim = parts[0].shape
    out = parts[0].new_zeros(len(parts), heads, length, dim)
    for i, part in enumerate(parts):
        out[i, :, length - part.size(1) :] = part
    return out
