"""Rollouts on a vLLM server: the backend, and the policy as the server sees it (a LoRA adapter).

Training pushes the adapter after every optimiser step (`RemotePolicy.sync`): it is saved to a new
folder and loaded under a new name (`<run>-step-N`), and every completion request names the adapter
it wants, so a step can never sample from a stale one: the name it asks for exists only once the
load has answered. The previous adapter is unloaded and its folder removed. Full fine-tuning would
need the weights streamed into the server (TRL does it over NCCL), which is not built: it is refused.

Each prompt is one request with its own seed, so a prompt's completions do not depend on the batch
it was sampled in; the requests of a batch run concurrently and the server batches them.
"""

from __future__ import annotations

import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.config import ConfigError
from pipelines.generation.vllm_client import Completion, VLLMClient, VLLMError

# A served base whose log-probs of a fixed token sequence differ from the pinned reference's by more than this
# (mean over tokens, nats) is another model. bf16 serving against fp32 training differs by about 0.01-0.05.
SERVED_BASE_TOLERANCE = 0.25
PROBE_TOKENS = 48


def check_served_base(client: VLLMClient, base: str, policy: Any, url: str) -> float:
    """The mean log-prob difference between the server's `base` and the pinned reference (the policy with its
    adapter off) on a fixed token sequence; a ConfigError when it is another model. A URL names a server the
    pipeline did not start, and a name says nothing about the weights behind it."""
    vocabulary = policy.get_base_model().config.vocab_size
    ids = [(7919 * i + 13) % vocabulary for i in range(PROBE_TOKENS)]  # fixed, spread over the vocabulary
    served = client.prompt_logprobs(base, ids)[1:]
    with torch.no_grad(), policy.disable_adapter():
        logits = policy(input_ids=torch.tensor([ids], device=policy.device)).logits.float()[0, :-1].cpu()
    local = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist()
    pairs = [(a, b) for a, b in zip(served, local, strict=True) if a is not None]
    gap = sum(abs(a - b) for a, b in pairs) / max(len(pairs), 1)
    if not pairs or gap > SERVED_BASE_TOLERANCE:
        raise ConfigError(
            f"the vLLM server at {url} serves {base!r}, but its log-probs differ from the pinned reference's by "
            f"{gap:.2f} nats a token on average (same model: under {SERVED_BASE_TOLERANCE}): it serves other weights. "
            "Fix: start it on this project's models/reference, or unset runtime.vllm.url"
        )
    return gap


@dataclass(frozen=True)
class RemoteModel:
    """What `generate()` samples from with the vllm backend: a server and the model name to ask for."""

    client: VLLMClient
    name: str


class RemotePolicy:
    """Stands where the sampling copy stands for the local backends: `.model` to sample, `.sync()` after each step."""

    def __init__(self, policy: Any, client: VLLMClient, base_name: str, adapter_root: Path) -> None:
        if not hasattr(policy, "peft_config"):
            raise ConfigError(
                "runtime.rollout_backend=vllm trains LoRA adapters only (the adapter reaches the server every "
                "step; full weights would have to be streamed into it, which is not built): set "
                "train.lora.enabled=true, or use runtime.rollout_backend=lean or hf"
            )
        self.policy = policy
        self.client = client
        self.base_name = base_name
        self.adapter_root = adapter_root
        self.run = uuid.uuid4().hex[:8]  # another trainer on the same server never shares a name
        self.version = 0
        self.current: str | None = None
        self.sync()

    @property
    def model(self) -> RemoteModel:
        assert self.current is not None
        return RemoteModel(self.client, self.current)

    def sync(self) -> None:
        """Save the adapter as it is now and make the server sample from it from the next request on."""
        self.version += 1
        name = f"grpo-{self.run}-{self.version}"
        folder = self.adapter_root / name
        self.policy.save_pretrained(folder, safe_serialization=True)
        self.client.load_adapter(name, str(folder.resolve()))
        previous, self.current = self.current, name
        if previous is not None:
            self.client.unload_adapter(previous)
            shutil.rmtree(self.adapter_root / previous, ignore_errors=True)

    def close(self) -> None:
        if self.current is not None:
            try:
                self.client.unload_adapter(self.current)
            except VLLMError:
                pass  # the server is gone: nothing to unload
            shutil.rmtree(self.adapter_root / self.current, ignore_errors=True)
            self.current = None


def sampling_body(request: Any, seed: int | None) -> dict[str, Any]:
    """The OpenAI-API fields of a sampling request (vLLM's extras: top_k, min_tokens, seed)."""
    body: dict[str, Any] = {"max_tokens": request.max_new_tokens, "min_tokens": request.min_new_tokens}
    if request.do_sample:
        body |= {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k}
    else:
        body |= {"temperature": 0.0, "top_p": 1.0, "top_k": 0}  # stated, so no server default applies
    if seed is not None:
        body["seed"] = seed
    return body


def lay_out(completions: list[list[Completion]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probs), (prompts x n, T), group after group, padded after each completion's end.

    >>> c = [[Completion([5, 2], [-0.5, -0.1], "stop"), Completion([7], [-1.0], "length")]]
    >>> ids, logps = lay_out(c, pad_id=0)
    >>> ids.tolist(), logps.tolist()
    ([[5, 2], [7, 0]], [[-0.5, -0.10000000149011612], [-1.0, 0.0]])
    """
    rows = [c for group in completions for c in group]
    width = max(len(c.ids) for c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    logps = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, c in enumerate(rows):
        ids[i, : len(c.ids)] = torch.tensor(c.ids)
        logps[i, : len(c.logps)] = torch.tensor(c.logps)
    return ids, logps


def sample(
    model: RemoteModel, tokenizer: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, request: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probs) of `num_generations` completions per prompt from the server, one request per prompt."""
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
    seeds = request.seeds if request.seeds is not None else [None] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: pass one per prompt")

    def one(i: int) -> list[Completion]:
        return model.client.complete(model.name, prompts[i], request.num_generations, sampling_body(request, seeds[i]))

    with ThreadPoolExecutor(max_workers=min(16, len(prompts))) as pool:
        completions = list(pool.map(one, range(len(prompts))))
    return lay_out(completions, tokenizer.pad_token_id)
