"""The rollout interface: prompts in, `Rollout` out (token ids, masks, texts, the sampler's log-probs).

`generate()` does what every backend shares: chat template, tokenisation with left padding,
completion masks, decoding to text. Training (grpo/batch.py) and evaluation
(evaluation/scoring.py) both sample through it; the backend (backends.py) does the sampling itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipelines.device import autocast, model_device
from pipelines.generation.backends import SamplingRequest, get_backend
from pipelines.generation.multi_turn import Environment, lay_out, run_episodes, transcript


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C) right-padded
    completion_mask: torch.Tensor  # (N, C) 1 up to and including EOS
    truncated: torch.Tensor  # (N,) bool: no EOS within the length limit
    texts: list[str]
    group_size: int = 1  # rows come in groups of this many completions of one prompt
    # (N, C) the sampler's log-prob of each completion token (0 after EOS); None if not reported
    sampler_logps: torch.Tensor | None = None
    # Multi-turn episodes (multi_turn.py): (N, C) 1 on the model's own tokens, 0 on tool replies and
    # template tokens between turns (attended, never trained); None = every completion token is the model's.
    loss_mask: torch.Tensor | None = None
    episodes: list[list[dict[str, Any]]] | None = None  # each episode's turns: text, call, result, error, time

    @classmethod
    def empty(cls, group_size: int) -> Rollout:
        """No rows: the slice of a process that sampled nothing this round (grpo/distributed.py)."""
        ids = torch.zeros(0, 0, dtype=torch.long)
        return cls(ids, ids, ids, ids, torch.zeros(0, dtype=torch.bool), [], group_size, torch.zeros(0, 0))

    @property
    def transcripts(self) -> list[str]:
        """Each completion as a reader should see it: an episode's every turn and tool reply, else the text."""
        return self.texts if self.episodes is None else [transcript(turns) for turns in self.episodes]

    @property
    def trained_mask(self) -> torch.Tensor:
        """The tokens the loss, the KL and the entropy read: the model's own."""
        return self.completion_mask if self.loss_mask is None else self.loss_mask

    @property
    def rows(self) -> int:
        return self.completion_ids.size(0)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def to(self, device: torch.device) -> Rollout:
        """The same rollout with its tensors on `device` (itself when they are there already)."""
        if self.completion_ids.device == device:
            return self
        return Rollout(
            prompt_ids=self.prompt_ids.to(device),
            prompt_mask=self.prompt_mask.to(device),
            completion_ids=self.completion_ids.to(device),
            completion_mask=self.completion_mask.to(device),
            truncated=self.truncated.to(device),
            texts=self.texts,
            group_size=self.group_size,
            sampler_logps=None if self.sampler_logps is None else self.sampler_logps.to(device),
            loss_mask=None if self.loss_mask is None else self.loss_mask.to(device),
            episodes=self.episodes,
        )

    def completion_token_lists(self) -> list[list[int]]:
        return [ids[mask.bool()].tolist() for ids, mask in zip(self.completion_ids, self.completion_mask, strict=True)]

    def select(self, keep: torch.Tensor) -> Rollout:
        """The rows where `keep` (bool, one per row) is true."""
        idx = keep.nonzero().squeeze(-1)
        return Rollout(
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            completion_ids=self.completion_ids[idx],
            completion_mask=self.completion_mask[idx],
            truncated=self.truncated[idx],
            texts=[self.texts[i] for i in idx.tolist()],
            group_size=self.group_size if len(idx) % self.group_size == 0 else 1,
            sampler_logps=None if self.sampler_logps is None else self.sampler_logps[idx],
            loss_mask=None if self.loss_mask is None else self.loss_mask[idx],
            episodes=None if self.episodes is None else [self.episodes[i] for i in idx.tolist()],
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
        group_size=parts[0].group_size if len({p.group_size for p in parts}) == 1 else 1,
        sampler_logps=(
            torch.cat([right(p.sampler_logps, width_c, 0) for p in parts])  # type: ignore[arg-type]
            if all(p.sampler_logps is not None for p in parts)
            else None
        ),
        loss_mask=(
            None
            if all(p.loss_mask is None for p in parts)
            else torch.cat([right(p.trained_mask, width_c, 0) for p in parts])
        ),
        episodes=(
            None
            if all(p.episodes is None for p in parts)
            else [e for p in parts for e in (p.episodes or [[]] * p.rows)]
        ),
    )


def render_prompts(tokenizer: Any, prompts: list[Any], tools: tuple[Any, ...] = ()) -> list[str]:
    """Chat-templated prompt strings (plain strings pass through unchanged), with the tools described
    in the template's own tool format where it has one, else in the system prompt (verifiers/tools.py)."""
    from pipelines.verifiers.tools import describe, native_format, schema

    kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
    native = bool(tools) and native_format(tokenizer)
    if native:
        kwargs["tools"] = [schema(fn) for fn in tools]
    out = []
    for p in prompts:
        if not isinstance(p, list):
            out.append(p)
            continue
        messages = p if native or not tools else _with_system(p, describe(tools))
        out.append(tokenizer.apply_chat_template(messages, **kwargs))
    return out


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`text` added to the system prompt (a system message first when there is none)."""
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


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
    seeds: list[int] | None = None,
    min_new_tokens: int = 0,
    environment: Environment | None = None,
) -> Rollout:
    """`num_generations` completions of each prompt, laid out group after group.

    `backend` names a rollout backend (pipelines/generation/backends.py: `lean`, `hf`, `vllm`); this
    function does the rest, the same for all: chat template, tokenisation, masks, decoding.
    `seeds` (one per prompt) make each prompt's completions reproducible on their own. With an
    `environment` (a task's tools), each completion is a multi-turn episode (multi_turn.py).
    """
    tokenizer.padding_side = "left"
    tools = environment.tools if environment is not None else ()
    rendered = render_prompts(tokenizer, prompts, tools)
    encoded = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    request = SamplingRequest(
        num_generations=num_generations,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seeds=seeds,
        min_new_tokens=min_new_tokens,
    )
    device = model_device(model)
    if environment is not None:
        with autocast(device, bf16):
            episodes = run_episodes(
                model, tokenizer, encoded["input_ids"], encoded["attention_mask"], request, backend, environment
            )
        return Rollout(
            prompt_ids=encoded["input_ids"].repeat_interleave(num_generations, dim=0),
            prompt_mask=encoded["attention_mask"].repeat_interleave(num_generations, dim=0),
            group_size=num_generations,
            **lay_out(episodes, tokenizer.pad_token_id),
        )
    with autocast(device, bf16):
        sampled = get_backend(backend).completions(
            model, tokenizer, encoded["input_ids"], encoded["attention_mask"], request
        )
    # A rollout is data: it lives on the CPU, and the training pass moves it to the model (Rollout.to).
    completion_ids = sampled.ids.cpu()
    sampler_logps = None if sampled.logps is None else sampled.logps.cpu()
    mask, truncated = completion_mask(completion_ids, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(
        completion_ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True
    )
    return Rollout(
        prompt_ids=encoded["input_ids"].repeat_interleave(num_generations, dim=0),
        prompt_mask=encoded["attention_mask"].repeat_interleave(num_generations, dim=0),
        completion_ids=completion_ids,
        completion_mask=mask,
        truncated=truncated,
        texts=texts,
        group_size=num_generations,
        sampler_logps=None if sampler_logps is None else sampler_logps * mask,
    )
