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


def _opening_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Four prompts that open with the same 20 tokens, then 1-6 tokens of their own, left-padded."""
    g = torch.Generator().manual_seed(2)
    opening = torch.randint(3, 64, (20,), generator=g)
    own = [torch.randint(3, 64, (n,), generator=g) for n in (3, 6, 1, 4)]
    width = 20 + max(len(o) for o in own)
    ids = torch.zeros(len(own), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, rest in enumerate(own):
        prompt = torch.cat([opening, rest])
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def test_the_common_opening_is_prefilled_once_and_the_logits_are_the_same():
    from transformers import DynamicCache

    from pipelines.generation.lean_decode import common_opening, prefill

    model = _tiny("llama")
    ids, mask = _opening_prompts()
    assert common_opening(ids, mask) == 20
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda _m, args, _o: calls.append(tuple(args[0].shape)))
    whole, _, _ = prefill(model, ids, mask, DynamicCache(), pad_id=0, share_opening=False)
    split, split_mask, positions = prefill(model, ids, mask, DynamicCache(), pad_id=0)
    hook.remove()
    assert calls == [(4, 26), (1, 20), (4, 6)], "the opening was not run once, then each prompt's rest"
    torch.testing.assert_close(split.logits, whole.logits, atol=1e-5, rtol=1e-5)
    # Each row's positions still count only its own tokens: the pad between opening and rest is skipped.
    assert positions[:, -1].tolist() == [22, 25, 20, 23] and split_mask.sum(-1).tolist() == [23, 26, 21, 24]


@pytest.mark.parametrize("shared_attention", [False, True], ids=["repeated-cache", "shared-prefix"])
def test_decoding_after_a_shared_opening_is_the_same(shared_attention):
    model = _tiny("llama")
    if shared_attention:
        assert shared_prefix.enable(model)
    ids, mask = _opening_prompts()
    kwargs = {"eos_id": 0, "pad_id": 0, "max_new_tokens": 10}
    greedy = [sample(model, ids, mask, num_generations=1, do_sample=False, share_opening=s, **kwargs) for s in (0, 1)]
    assert torch.equal(greedy[0][0], greedy[1][0])
    sampled = []
    for share in (False, True):
        torch.manual_seed(3)  # no generators: the global stream, the same for both
        sampled.append(sample(model, ids, mask, num_generations=3, do_sample=True, share_opening=share, **kwargs))
    assert torch.equal(sampled[0][0], sampled[1][0])
    torch.testing.assert_close(sampled[1][1], sampled[0][1], atol=1e-5, rtol=1e-5)


def test_seeded_sampling_keeps_one_pass_per_prompt():
    """Training's seeded rollouts must not depend on the batch: no opening split by default."""
    model = _tiny("llama")
    ids, mask = _opening_prompts()
    shapes = []
    hook = model.model.embed_tokens.register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
    sample(
        model,
        ids,
        mask,
        num_generations=2,
        max_new_tokens=1,
        eos_id=0,
        pad_id=0,
        generators=row_generators([1, 2, 3, 4], 2),
    )
    hook.remove()
    assert shapes[0] == tuple(ids.shape)


def _lm_head_inputs(model) -> list[torch.Tensor]:
    """Every input the LM head sees from now on (the model frozen, as the sampling copy is)."""
    model.requires_grad_(False)
    seen: list[torch.Tensor] = []
    model.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    return seen


@pytest.mark.parametrize("share", [False, True], ids=["one-pass", "shared-opening"])
def test_the_lm_head_of_a_frozen_model_gets_a_contiguous_input_at_prefill(share):
    """A sliced (non-contiguous) input makes torch.matmul copy the LM head's weight once per row
    when the weight does not require grad: seconds per call at 64 prompts (lean_decode.last_positions)."""
    model = _tiny("llama")
    seen = _lm_head_inputs(model)
    ids, mask = _opening_prompts()
    sample(model, ids, mask, num_generations=2, max_new_tokens=3, eos_id=0, pad_id=0, share_opening=share)
    assert seen and all(x.is_contiguous() for x in seen), [x.stride() for x in seen]


@pytest.mark.parametrize("group_size", [1, 3])
def test_the_lm_head_of_a_frozen_model_gets_a_contiguous_input_in_the_logprob_pass(group_size):
    from pipelines.generation.rollout import Rollout, completion_mask
    from pipelines.grpo.logprobs import token_logps

    model = _tiny("llama")
    ids, mask = _prompts()
    completions = torch.randint(3, 64, (3 * group_size, 5), generator=torch.Generator().manual_seed(4))
    completions[0, 2] = 1  # one completion ends early
    keep, truncated = completion_mask(completions, eos_id=1)
    rollout = Rollout(
        ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0), completions, keep, truncated,
        [""] * completions.size(0), group_size,
    )  # fmt: skip
    expected, _ = token_logps(model, rollout)
    seen = _lm_head_inputs(model)
    got, _ = token_logps(model, rollout)
    assert seen and all(x.is_contiguous() for x in seen), [x.stride() for x in seen]
    torch.testing.assert_close(got, expected)
