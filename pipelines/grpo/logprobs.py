"""Log-probabilities of chosen tokens (and entropies) from LM-head logits, a block of rows at a time.

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

import torch

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
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return chosen, entropy

    @staticmethod
    def backward(ctx, grad_chosen, _grad_entropy):  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        step = _block_rows(logits.size(-1))
        dtype = _compute_dtype(logits)
        scale = grad_chosen.to(dtype) / ctx.temperature
        for start in range(0, logits.size(0), step):
            end = min(start + step, logits.size(0))
            x = logits[start:end].to(dtype)
            if ctx.temperature != 1.0:
                x = x / ctx.temperature
            # d chosen / d logits = (onehot(target) - softmax) / temperature
            block = (x - lse[start:end, None]).exp_().mul_(-scale[start:end, None])
            block.scatter_add_(-1, targets[start:end, None], scale[start:end, None])
            grad[start:end] = block
        return grad, None, None, None
