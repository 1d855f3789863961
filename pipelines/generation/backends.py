"""Rollout backends: what turns tokenised prompts into completion ids, chosen by name.

`generate()` in rollout.py does what every backend shares — chat template, tokenisation with left
padding, completion masks, decoding — and hands a backend only the part that differs: sampling
`num_generations` completions per prompt. Pick one with `runtime.rollout_backend`:

- `lean` (default): our KV-cached loop (lean_decode.py), fastest for small models on CPU, and the
  only one that honours a seed per prompt (what data-parallel training needs to match one process).
- `hf`: `model.generate` from transformers, the reference behaviour.
- `vllm`: a vLLM server (vllm_backend.py, vllm_server.py): what people scale to on GPUs; LoRA only.

To add a backend, write a class with a `completions` method of the `RolloutBackend` protocol,
give it a `name`, add it to `BACKENDS`, and add the name to `RolloutBackendName` in pipelines/config.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pipelines.config import ConfigError

if TYPE_CHECKING:
    from pipelines.generation.lean_decode import TurnEnds


class BackendUnavailable(ConfigError):
    """The configured backend cannot run here; the message names the fix (`grpo` prints it, no traceback)."""


@dataclass(frozen=True)
class SamplingRequest:
    """How to sample: the same knobs for every backend."""

    num_generations: int
    max_new_tokens: int
    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0  # EOS is not sampled before this many tokens
    # One seed per prompt (training passes them; evaluation does not). A backend that cannot seed
    # each prompt on its own says how it approximates it.
    seeds: list[int] | None = None


@dataclass(frozen=True)
class Sampled:
    """What a backend returns: token ids and, if it can say, the sampler's log-probs of them."""

    ids: torch.Tensor  # (prompts x num_generations, T)
    # (same shape) log-probability of each token under the distribution the backend drew it from
    # (after temperature, top-k, top-p); None when the backend cannot report it. Training uses it
    # to correct for a sampler that is not bit-for-bit the trained model (train.sampling_correction).
    logps: torch.Tensor | None = None


class RolloutBackend(Protocol):
    """The contract: `completions` returns `Sampled` ids of shape (prompts x num_generations, T),
    the completions of prompt 0 first, then prompt 1's, and so on (group after group). Tokens
    after a completion's first EOS are ignored (the caller masks them), so a backend may pad with
    anything there. `input_ids` and `attention_mask` are (prompts, P), padded on the left.
    A backend that cannot report log-probs returns `Sampled(ids)`.
    """

    def completions(
        self,
        model: Any,
        tokenizer: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        request: SamplingRequest,
    ) -> Sampled: ...


class LeanBackend:
    """One prefill per prompt and a shared KV cache (pipelines/generation/lean_decode.py); seeds per prompt.

    `turn_ends` (beyond the protocol) runs multi-turn episodes inside the loop (multi_turn.in_loop):
    one call passes the request's knobs to the loop, so episodes and single turns cannot drift apart."""

    name = "lean"

    def completions(
        self,
        model: Any,
        tokenizer: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        request: SamplingRequest,
        turn_ends: TurnEnds | None = None,
    ) -> Sampled:
        from pipelines.generation.lean_decode import sample

        generators = row_generators(request, input_ids.size(0))
        ids, logps = sample(
            model,
            input_ids,
            attention_mask,
            num_generations=request.num_generations,
            max_new_tokens=request.max_new_tokens,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            do_sample=request.do_sample,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            generators=generators,
            min_new_tokens=request.min_new_tokens,
            turn_ends=turn_ends,
        )
        return Sampled(ids, logps)


def row_generators(request: SamplingRequest, prompts: int) -> list[torch.Generator] | None:
    """The lean loop's generators for a request: one per completion row, from the prompts' seeds."""
    from pipelines.generation import lean_decode

    if request.seeds is None or not request.do_sample:
        return None
    if len(request.seeds) != prompts:
        raise ValueError(f"{len(request.seeds)} seeds for {prompts} prompts: pass one per prompt")
    return lean_decode.row_generators(request.seeds, request.num_generations)


class HFGenerateBackend:
    """`model.generate` from transformers.

    It draws from torch's global generator for the whole batch, so with seeds it seeds one call
    (from the first prompt's seed, inside `fork_rng` so the caller's stream is untouched): the
    result is reproducible, but a prompt's completions depend on the batch it was sampled in.

    On a GPU it decodes into a static KV cache, which makes transformers compile the decode step
    (torch.compile, CUDA graphs): one graph launch a token instead of a few hundred kernel launches,
    which is what bounds a small model's decoding there. On the CPU the dynamic cache stays (no
    graphs to gain, and a compile per shape).
    """

    name = "hf"

    def completions(
        self,
        model: Any,
        tokenizer: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        request: SamplingRequest,
    ) -> Sampled:
        sampling: dict[str, Any] = {"do_sample": False}
        if request.do_sample:
            sampling = {
                "do_sample": True,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "top_k": request.top_k,
            }
        seeded = bool(request.seeds and request.do_sample)
        # On a GPU, generate draws from the GPU's generator: fork and seed that one too.
        gpus = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus, enabled=seeded, device_type=model.device.type):
            if seeded:
                torch.manual_seed(request.seeds[0])  # seeds the GPUs' generators as well
            out = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                max_new_tokens=request.max_new_tokens,
                min_new_tokens=request.min_new_tokens,
                num_return_sequences=request.num_generations,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                # The processed scores (after temperature, top-k, top-p) give the sampler's log-probs.
                output_scores=request.do_sample,
                return_dict_in_generate=True,
                **static_cache(model),
                **sampling,
            )
        ids = out.sequences[:, input_ids.size(1) :]
        if not request.do_sample:
            return Sampled(ids)
        scores = torch.stack(out.scores, dim=1).float()  # (rows, T, V)
        logps = torch.log_softmax(scores, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return Sampled(ids, logps.nan_to_num(neginf=0.0))  # pad rows after EOS may be -inf: masked anyway


def static_cache(model: Any) -> dict[str, Any]:
    """generate()'s cache settings for `model`'s device: a static cache (compiled decode) on a GPU."""
    return {"cache_implementation": "static"} if model.device.type == "cuda" else {}


class VLLMBackend:
    """A vLLM server over its OpenAI-compatible API (vllm_backend.py); `model` is a RemoteModel that
    names the adapter to sample from. Seeds per prompt; the sampler's log-probs."""

    name = "vllm"

    def completions(
        self,
        model: Any,
        tokenizer: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        request: SamplingRequest,
    ) -> Sampled:
        from pipelines.generation.vllm_backend import RemoteModel, sample

        if not isinstance(model, RemoteModel):
            raise BackendUnavailable(
                "runtime.rollout_backend=vllm samples from a vLLM server, but this caller passed a local model: "
                "open a vLLM session first (pipelines/generation/vllm_server.py)"
            )
        ids, logps = sample(model, tokenizer, input_ids, attention_mask, request)
        return Sampled(ids, logps if request.do_sample else None)


# By the names config.ROLLOUT_BACKENDS lists (tests/test_one_home.py checks the two agree).
BACKENDS: dict[str, RolloutBackend] = {
    backend.name: backend for backend in (LeanBackend(), HFGenerateBackend(), VLLMBackend())
}


def get_backend(name: str) -> RolloutBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown rollout backend {name!r}; set runtime.rollout_backend to one of {sorted(BACKENDS)}"
        ) from None
