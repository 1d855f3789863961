"""Shared-prefix decoding samples exactly what the repeated KV cache samples (fp32, tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch

from pipelines.generation import shared_prefix
from pipelines.generation.lean_decode import row_generators, sample


def _tiny(kind: str, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    # 4 query heads over 2 key/value heads: grouped-query attention, as SmolLM2 (9 over 3) has.
    config = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        **extra,
    )
    torch.manual_seed(0)
    return model_cls(config).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 5, 9 and 2 tokens, left-padded to 9."""
    lengths = [5, 9, 2]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    for row, n in enumerate(lengths):
        ids[row, 9 - n :] = torch.randint(3, 64, (n,), generator=g)
        mask[row, 9 - n :] = 1
    return ids, mask


def _both(model, eos_id: int, seeds: list[int] | None = None, **kwargs):
    """(repeated-cache result, shared-prefix result) of the same sampling call, each with fresh generators."""
    ids, mask = _prompts()
    fresh = lambda: None if seeds is None else row_generators(seeds, kwargs["num_generations"])  # noqa: E731
    plain = sample(model, ids, mask, eos_id=eos_id, pad_id=0, generators=fresh(), **kwargs)
    shared = copy.deepcopy(model)
    assert shared_prefix.enable(shared) and shared_prefix.enabled(shared)
    return plain, sample(shared, ids, mask, eos_id=eos_id, pad_id=0, generators=fresh(), **kwargs)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_sampled_completions_and_logps_equal_the_repeated_cache(kind):
    model = _tiny(kind)
    kwargs = {"num_generations": 3, "max_new_tokens": 12, "do_sample": True, "top_k": 20, "min_new_tokens": 2}
    # First without EOS (every row runs 12 tokens), then with a token the rows really sample as
    # EOS, so rows finish at different steps and leave the batch (and the prefix's group map).
    (ids, _), _ = _both(model, eos_id=0, seeds=[5, 6, 7], **{**kwargs, "min_new_tokens": 12})
    counts = torch.bincount(ids[:, 3:].flatten(), minlength=64)
    eos = int(counts.argmax())
    (plain_ids, plain_logps), (ids, logps) = _both(model, eos_id=eos, seeds=[5, 6, 7], **kwargs)
    finished = (plain_ids == eos).any(-1)
    assert 0 < int(finished.sum()) < plain_ids.size(0), (
        "no row finished early, or all did: the test would not exercise removal"
    )
    assert torch.equal(plain_ids, ids)
    torch.testing.assert_close(logps, plain_logps, atol=1e-5, rtol=1e-5)


def test_greedy_decoding_is_the_same():
    model = _tiny("llama")
    (plain, _), (shared, _) = _both(model, eos_id=0, num_generations=2, max_new_tokens=10, do_sample=False)
    assert torch.equal(plain, shared)


def test_the_attention_function_is_sdpa_without_a_prefix():
    model = _tiny("llama")
    ids, mask = _prompts()
    expected = model(input_ids=ids, attention_mask=mask).logits
    shared = copy.deepcopy(model)
    shared_prefix.enable(shared)
    torch.testing.assert_close(shared(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4}),
        ("llama", {"attn_implementation": "flex_attention"}),
    ],
    ids=["sliding-window", "other-attention"],
)
def test_models_it_cannot_serve_keep_the_repeated_cache(kind, extra):
    model = _tiny(kind, **extra)
    before = model.config._attn_implementation
    assert not shared_prefix.enable(model)
    assert model.config._attn_implementation == before and not shared_prefix.enabled(model)


def test_an_unsupported_family_keeps_the_repeated_cache():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert not shared_prefix.enable(model) and not shared_prefix.enabled(model)


@pytest.mark.parametrize("backend", ["lean", "hf"])
def test_the_sampling_copy_reports_what_training_computes(tiny_reference, backend):
    """On the fp32 sampling copy (shared-prefix attention on), each backend's log-probs equal the
    trained model's own, which is what the sampling correction assumes when nothing differs."""
    from pipelines.config import LoraConfig
    from pipelines.generation.rollout import generate
    from pipelines.generation.sampling_copy import SamplingCopy
    from pipelines.grpo.logprobs import token_logps
    from pipelines.grpo.policy import add_lora
    from pipelines.snapshot.loading import load_reference

    base, tokenizer = load_reference(tiny_reference)
    policy = add_lora(base, LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)  # an adapter that changes the outputs
    sampler = SamplingCopy(policy, torch.float32)
    assert shared_prefix.enabled(sampler.model)
    rollout = generate(
        sampler.model,
        tokenizer,
        ["What is 2 + 2?", "Compute 7 * 8, please."],
        num_generations=3,
        max_new_tokens=8,
        do_sample=True,
        temperature=0.8,
        backend=backend,
        seeds=[1, 2],
    )
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        trained, _ = token_logps(policy, rollout, temperature=0.8)
    torch.testing.assert_close(rollout.sampler_logps[mask], trained[mask], atol=1e-4, rtol=1e-4)
