"""The training log-prob pass: chosen-token log-probs and entropies of a rollout under a model.

`token_logps` runs the model over a rollout (a group's prompt once, completions bucketed by length);
`selected_logps` turns LM-head logits into log-probs and entropies, a block of rows at a time.

The plain way, `log_softmax(logits.float()).gather(...)`, writes several full (tokens x vocabulary)
fp32 tensors: the fp32 copy, the log-softmax kept for backward, the probabilities and their product
for the entropy, and in backward a scattered gradient and the log-softmax gradient. With
SmolLM2's 49,152-token vocabulary that is 200 KB a token per tensor, so for a few hundred
completion tokens these passes run from main memory and took about a sixth of the training pass
on 2 CPU cores (profiled: exp, log-softmax, its backward, the product and the casts). Here each
block of rows is converted, reduced and differentiated while it is in the cache, and only the
input logits (bf16 under autocast, already in memory) and one log-sum-exp per row are kept for
backward, where each block's softmax is recomputed. TRL's `selective_log_softmax` saves memory
the same way in forward only; this does it in backward too.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from pipelines.device import autocast, model_device
from pipelines.generation.lean_decode import cache_kwargs, last_positions
from pipelines.generation.rollout import Rollout
from pipelines.grpo import sharding

# Rows per block: ~2 MB of fp32 logits for SmolLM2's vocabulary, which stays in a core's share of
# the cache through the block's few element-wise passes.
BLOCK_BYTES = 2 << 20


def selected_logps(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature) at `targets`, and the softmax's entropy if asked.

    `logits` is (..., vocabulary) in any float dtype, `targets` the matching (...) token ids; the
    results are fp32 (fp64 for fp64 logits). The
    log-probabilities are differentiable with respect to `logits`; the entropy is a metric and
    carries no gradient.

    >>> logits = torch.tensor([[0.0, 0.0], [0.0, 100.0]])
    >>> chosen, entropy = selected_logps(logits, torch.tensor([0, 1]), with_entropy=True)
    >>> [round(v, 4) for v in chosen.tolist()], [round(v, 4) for v in entropy.tolist()]
    ([-0.6931, 0.0], [0.6931, 0.0])
    """
    shape = targets.shape
    flat, flat_targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    chosen, entropy = _SelectedLogps.apply(flat, flat_targets, float(temperature), with_entropy)
    return chosen.view(shape), (entropy.view(shape) if with_entropy else None)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _block_rows(vocabulary: int) -> int:
    return max(1, BLOCK_BYTES // (4 * vocabulary))


class _SelectedLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy):  # type: ignore[override]
        rows, dtype = logits.size(0), _compute_dtype(logits)
        chosen = torch.empty(rows, dtype=dtype, device=logits.device)
        lse = torch.empty(rows, dtype=dtype, device=logits.device)
        entropy = torch.empty(rows if with_entropy else 0, dtype=dtype, device=logits.device)
        step = _block_rows(logits.size(-1))
        # fp32 throughout, also when called under bf16 autocast (as the training pass is).
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, rows, step):
                end = min(start + step, rows)
                x = logits[start:end].to(dtype)  # a copy (or a view of fp32 input, so never written to)
                if temperature != 1.0:
                    x = x / temperature
                top = x.amax(-1, keepdim=True)
                shifted = x - top
                e = shifted.exp()
                total = e.sum(-1)
                log_total = total.log()
                lse[start:end] = top.squeeze(-1) + log_total
                chosen[start:end] = shifted.gather(-1, targets[start:end, None]).squeeze(-1) - log_total
                if with_entropy:
                    # H = -sum p log p = log(total) - sum(e * shifted) / total, with p = e / total.
                    entropy[start:end] = log_total - torch.linalg.vecdot(e, shifted) / total
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an unused output (the entropy, mostly) costs nothing in backward
        return chosen, entropy

    @staticmethod
    def backward(ctx, grad_chosen, grad_entropy):  # type: ignore[override]
        logits, targets, lse, entropy = ctx.saved_tensors
        if grad_chosen is None and grad_entropy is None:
            return None, None, None, None
        grad = torch.empty_like(logits)
        step = _block_rows(logits.size(-1))
        dtype = _compute_dtype(logits)
        rows = logits.size(0)
        zero = torch.zeros(rows, dtype=dtype, device=logits.device)
        scale = zero if grad_chosen is None else grad_chosen.to(dtype) / ctx.temperature
        h_scale = None if grad_entropy is None else grad_entropy.to(dtype) / ctx.temperature
        for start in range(0, rows, step):
            end = min(start + step, rows)
            x = logits[start:end].to(dtype)
            if ctx.temperature != 1.0:
                x = x / ctx.temperature
            log_p = x - lse[start:end, None]
            if h_scale is None:
                # d chosen / d logits = (onehot(target) - softmax) / temperature
                block = log_p.exp_().mul_(-scale[start:end, None])
            else:
                # and d entropy / d logits = -softmax * (log softmax + entropy) / temperature
                block = log_p.exp() * (
                    -scale[start:end, None] - h_scale[start:end, None] * (log_p + entropy[start:end, None])
                )
            block.scatter_add_(-1, targets[start:end, None], scale[start:end, None])
            grad[start:end] = block
        return grad, None, None, None


def token_logps(
    model: Any, rollout: Rollout, bf16: bool = False, with_entropy: bool = False, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the completion tokens under `model` (and their entropies).

    `temperature` divides the logits first, as TRL does: the policy-gradient is then taken for the
    distribution the completions were sampled from (top-k and top-p are not applied, also as TRL).

    Only completion positions go through the LM head, and position ids follow the left padding,
    as they did during generation. When completions come in groups of one prompt, the prompt runs
    once per group and its KV cache is shared by the group's completions (gradients still flow
    through the prompt's keys and values: the adapter changes them too), and completions of similar
    length are batched together so padding after a short answer costs nothing. With an 80-token
    prompt and 8 completions of 10-64 tokens this cuts the tokens through the model by 2-4x.
    """
    device = model_device(model)
    if rollout.rows == 0:  # a process that kept no group this step (grpo/distributed.py): nothing to score
        nothing = torch.zeros(rollout.completion_ids.shape, device=device)
        if sharding.is_sharded(model):
            # Yet under FSDP it calls the model as the others do (a collective), on one token weighing 0:
            # its backward then joins theirs, which reduces the gradients.
            token = torch.zeros((1, 1), dtype=torch.long, device=device)
            nothing = nothing + 0.0 * model(input_ids=token).logits.sum()
        return nothing, nothing.clone() if with_entropy else None
    rollout = rollout.to(device)  # a no-op where it already is
    recomputed = _checkpointing(model)
    # (Under checkpointing, backward recomputes attention outside this function: the kernel must be PyTorch's
    # own choice there too, or the recomputed tensors differ from the saved ones.)
    kernel = nullcontext() if recomputed else _attention_kernel(rollout.completion_ids)
    # Under FSDP (grpo/sharding.py) each call of the model is a collective, so every process must call it
    # as often as the others: one call, not one per length bucket of this process's own completions.
    one_call = recomputed or sharding.is_sharded(model)
    with autocast(device, bf16), kernel:
        if rollout.group_size > 1 and rollout.completion_ids.size(1) > 1 and not one_call:
            return _grouped_logps(model, rollout, with_entropy, temperature)
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
        attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        width = rollout.completion_ids.size(1)
        logits = model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            logits_to_keep=last_positions(ids.size(1), width + 1, ids.device),
        ).logits[:, :-1]
    return selected_logps(logits, rollout.completion_ids, temperature, with_entropy)


def _checkpointing(model: Any) -> bool:
    """Whether this pass recomputes layers in backward: gradient checkpointing drops the KV cache
    the grouped pass shares a prompt through (transformers sets `cache=None` in each layer), so
    prompt and completion then run as one sequence."""
    if not (model.training and torch.is_grad_enabled()):
        return False
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the new name, then the old
        try:
            return bool(getattr(model, name))
        except AttributeError:
            continue
    return False


def _attention_kernel(like: torch.Tensor) -> AbstractContextManager[Any]:
    """SDPA's math kernel when gradients flow on the CPU, else PyTorch's own choice.

    On the CPU, PyTorch picks its flash-attention kernel, whose backward on these short sequences
    (a prompt of ~80 tokens, completions of 10-64) measured 13x its forward and a fifth of the
    whole training pass. With the math kernel the pass (log-probs, loss, backward, AdamW) for
    4 prompts x 8 took 4.34 s against 4.97 s (median of 4, alternating in one process on the
    embedded model). Inference keeps flash.
    """
    if like.device.type != "cpu" or not torch.is_grad_enabled():
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def length_buckets(lengths: list[int], overhead: int = 32, max_buckets: int = 4) -> list[list[int]]:
    """Rows grouped so that sum(rows x longest length in bucket) + overhead per bucket is smallest.

    >>> length_buckets([3, 60, 4, 5, 2, 3, 4, 6])
    [[4, 0, 5, 2, 6, 3, 7], [1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = {0: (0, [])}  # rows taken -> (cost, bucket ends)
    for _ in range(max_buckets):
        nxt = dict(best)
        for taken, (cost, ends) in best.items():
            for end in range(taken + 1, n + 1):
                c = cost + (end - taken) * lengths[order[end - 1]] + overhead
                if end not in nxt or c < nxt[end][0]:
                    nxt[end] = (c, [*ends, end])
        best = nxt
    ends = best[n][1]
    return [order[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def _grouped_logps(
    model: Any, rollout: Rollout, with_entropy: bool, temperature: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from transformers import DynamicCache

    G = rollout.group_size
    completion, mask = rollout.completion_ids, rollout.completion_mask
    prompt_ids, prompt_mask = rollout.prompt_ids[::G], rollout.prompt_mask[::G]
    cache = DynamicCache()
    first = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
        **cache_kwargs(model, cache),
        use_cache=True,
        logits_to_keep=last_positions(prompt_ids.size(1), device=prompt_ids.device),
    ).logits[:, -1]  # (B, V): predicts each completion's first token
    prefix = [(layer.keys, layer.values) for layer in cache.layers]
    device = completion.device
    chosen = torch.zeros(completion.shape, dtype=torch.float32, device=device)
    entropy = torch.zeros(completion.shape, dtype=torch.float32, device=device) if with_entropy else None
    c0, e0 = selected_logps(first.repeat_interleave(G, dim=0), completion[:, 0], temperature, with_entropy)
    chosen[:, 0] = c0
    if entropy is not None:
        entropy[:, 0] = e0
    lengths = mask.sum(-1).clamp(min=1).tolist()
    for rows in length_buckets([int(n) for n in lengths]):
        width = max(int(lengths[r]) for r in rows) - 1  # tokens fed; each predicts the next one
        if width <= 0:
            continue
        idx = torch.tensor(rows, device=device)
        group = idx // G
        bucket_cache = DynamicCache()
        for layer, (keys, values) in enumerate(prefix):
            bucket_cache.update(keys[group], values[group], layer)
        attention = torch.cat([prompt_mask[group], mask[idx, :width]], dim=1)
        positions = prompt_mask[group].sum(-1, keepdim=True) + torch.arange(width, device=device).unsqueeze(0)
        logits = model(
            input_ids=completion[idx, :width],
            attention_mask=attention,
            position_ids=positions,
            **cache_kwargs(model, bucket_cache),
            use_cache=True,
        ).logits
        c, e = selected_logps(logits, completion[idx, 1 : width + 1], temperature, with_entropy)
        chosen[idx, 1 : width + 1] = c
        if entropy is not None:
            entropy[idx, 1 : width + 1] = e
    return chosen, entropy
