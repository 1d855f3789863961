"""Sampling completions: chat-templated prompts, batched KV-cached generation, completion masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipelines.grpo.sampling import sample


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C) right-padded
    completion_mask: torch.Tensor  # (N, C) 1 up to and including EOS
    truncated: torch.Tensor  # (N,) bool: no EOS within the length limit
    texts: list[str]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def completion_token_lists(self) -> list[list[int]]:
        return [ids[mask.bool()].tolist() for ids, mask in zip(self.completion_ids, self.completion_mask, strict=True)]

    def select(self, keep: torch.Tensor) -> Rollout:
        """The rows where `keep` (bool, one per row) is true."""
        idx = keep.nonzero().squeeze(-1)
        return Rollout(
            prompt_ids=self.prompt_ids[idx], prompt_mask=self.prompt_mask[idx],
            completion_ids=self.completion_ids[idx], completion_mask=self.completion_mask[idx],
            truncated=self.truncated[idx], texts=[self.texts[i] for i in idx.tolist()],
        )


def concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from several: prompts re-padded on the left, completions on the right."""
    if len(parts) == 1:
        return parts[0]
    width_p = max(p.prompt_ids.size(1) for p in parts)
    width_c = max(p.completion_ids.size(1) for p in parts)

    def left(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (width - t.size(1), 0), value=value)

    def right(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.size(1)), value=value)

    return Rollout(
        prompt_ids=torch.cat([left(p.prompt_ids, width_p, pad_id) for p in parts]),
        prompt_mask=torch.cat([left(p.prompt_mask, width_p, 0) for p in parts]),
        completion_ids=torch.cat([right(p.completion_ids, width_c, pad_id) for p in parts]),
        completion_mask=torch.cat([right(p.completion_mask, width_c, 0) for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
        texts=[t for p in parts for t in p.texts],
    )


def render_prompts(tokenizer: Any, prompts: list[Any]) -> list[str]:
    """Chat-templated prompt strings (plain strings pass through unchanged)."""
    return [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) if isinstance(p, list) else p
        for p in prompts
    ]


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, truncated): the mask keeps tokens up to and including the first EOS.

    >>> m, t = completion_mask(torch.tensor([[5, 2, 2], [5, 6, 7]]), eos_id=2)
    >>> m.tolist(), t.tolist()
    ([[1, 1, 0], [1, 1, 1]], [False, True])
    """
    is_eos = completion_ids == eos_id
    seen = is_eos.int().cumsum(-1)
    # Keep a token when no EOS came strictly before it.
    mask = ((seen - is_eos.int()) == 0).int()
    return mask, ~is_eos.any(-1)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    *,
    num_generations: int,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    bf16: bool = False,
    backend: str = "lean",
) -> Rollout:
    """`num_generations` completions of each prompt, laid out group after group.

    Backends: `lean` (pipelines/grpo/sampling.py: one prefill per prompt, shared KV cache) or
    `hf` (`model.generate`). A GPU backend such as vLLM plugs in here.
    """
    tokenizer.padding_side = "left"
    encoded = tokenizer(render_prompts(tokenizer, prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if backend == "hf":
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {"do_sample": False}
            out = model.generate(
                input_ids=encoded["input_ids"],
                attention_mask=encoded["attention_mask"],
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_generations,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            completion_ids = out[:, encoded["input_ids"].size(1) :]
        elif backend == "lean":
            completion_ids = sample(
                model, encoded["input_ids"], encoded["attention_mask"], num_generations=num_generations,
                max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            )
        else:
            raise ValueError(f"unknown rollout backend {backend!r}; use `lean` or `hf`")
    mask, truncated = completion_mask(completion_ids, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(completion_ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    return Rollout(
        prompt_ids=encoded["input_ids"].repeat_interleave(num_generations, dim=0),
        prompt_mask=encoded["attention_mask"].repeat_interleave(num_generations, dim=0),
        completion_ids=completion_ids,
        completion_mask=mask,
        truncated=truncated,
        texts=texts,
    )


def token_logps(model: Any, rollout: Rollout, bf16: bool = False, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the completion tokens under `model` (and their entropies).

    Only the completion positions go through the LM head (`logits_to_keep`), and position ids
    follow the left padding, as they did during generation.
    """
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    width = rollout.completion_ids.size(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=width + 1).logits
    logits = logits[:, :-1].float()
    logps = torch.log_softmax(logits, dim=-1)
    chosen = logps.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logps.exp() * logps).sum(-1)
    return chosen, entropy
