"""A later turn sampled from the KV cache kept since the last one samples what a fresh prefill of the
whole context samples (lean_decode.RowCache, turn_cache.resume, multi_turn.KeptTurns)."""

from __future__ import annotations

import copy

import pytest
import torch

from pipelines.generation import multi_turn, shared_prefix
from pipelines.generation.lean_decode import decode, row_generators, sample
from pipelines.generation.turn_cache import resume
from tests.test_shared_prefix import _prompts, _tiny

REPLY = [5, 7, 9, 11]  # the tokens between two turns: a tool's reply and the template around it


def _turns(model, generations: int, do_sample: bool):
    """Each row's first turn and the kept caches, with an EOS that ends some rows early."""
    ids, mask = _prompts()
    seeds = [3, 4, 5] if do_sample else None
    gens = lambda: None if seeds is None else row_generators(seeds, generations)  # noqa: E731
    kw = {"num_generations": generations, "max_new_tokens": 6, "pad_id": 0, "do_sample": do_sample}
    probe, _ = sample(model, ids, mask, eos_id=-1, generators=gens(), **kw)
    eos = int(probe[0, 2])  # row 0 ends within 3 tokens; other rows end when they meet it, or at 6
    kept = [None] * probe.size(0)
    first, _ = sample(model, ids, mask, eos_id=eos, generators=gens(), kept=kept, **kw)
    turns = []
    for row in first.tolist():
        turns.append(row[: row.index(eos) + 1] if eos in row else row)
    return ids, mask, turns, kept


@pytest.mark.parametrize("shared", [False, True], ids=["repeated-cache", "shared-prefix"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "seeded"])
def test_a_later_turn_from_the_kept_cache_samples_what_a_fresh_prefill_samples(shared, do_sample):
    model = _tiny("llama")
    if shared:
        model = copy.deepcopy(model)
        assert shared_prefix.enable(model)
    generations = 2
    ids, mask, turns, kept = _turns(model, generations, do_sample)
    assert all(k is not None for k in kept)
    assert len(turns[0]) <= 3 and any(len(t) == 6 for t in turns)  # some rows left early, some ran to the end
    rows = list(range(len(turns)))
    # The kept cache holds every token but each turn's last (sampled, not yet fed): that one comes first.
    new = [[t[-1], *REPLY] for t in turns]
    seeds = [11, 12, 13, 14, 15, 16]
    fresh = lambda: row_generators(seeds, 1) if do_sample else None  # noqa: E731
    kw = {"max_new_tokens": 5, "eos_id": 1, "pad_id": 0, "do_sample": do_sample}
    resumed, resumed_logps = decode(model, resume(model, [kept[r] for r in rows], new, 0), generators=fresh(), **kw)

    contexts = [ids[r // generations][mask[r // generations].bool()].tolist() + turns[r] + REPLY for r in rows]
    width = max(map(len, contexts))
    whole = torch.zeros(len(rows), width, dtype=torch.long)
    whole_mask = torch.zeros_like(whole)
    for r, c in enumerate(contexts):
        whole[r, width - len(c) :], whole_mask[r, width - len(c) :] = torch.tensor(c), 1
    again, again_logps = sample(_tiny("llama"), whole, whole_mask, num_generations=1, generators=fresh(), **kw)
    assert torch.equal(resumed, again)
    if do_sample:
        assert torch.allclose(resumed_logps, again_logps, atol=1e-5)


def test_episodes_on_the_lean_loop_equal_episodes_sampled_from_their_whole_context(tiny_reference, monkeypatch):
    """Every episode calls a tool twice: kept caches and full re-prefills give the same episodes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.generation.rollout import generate
    from pipelines.verifiers import tools
    from pipelines.verifiers.calculator_task import TASK

    tokenizer = AutoTokenizer.from_pretrained(tiny_reference)
    model = AutoModelForCausalLM.from_pretrained(tiny_reference).eval()
    # A random model over a 49k vocabulary almost never ends a turn: give EOS about 1 in 8 a token.
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight, head.bias.data = model.lm_head.weight, torch.zeros(head.out_features)
    head.bias.data[tokenizer.eos_token_id] = 9.5
    model.lm_head = head
    answered = tools.ToolResult({"name": "calculator", "arguments": {}}, "42", False, 0.0)
    monkeypatch.setattr(tools, "call_tool", lambda *a: answered)  # a tiny random model calls no tool by itself
    messages = [[{"role": "user", "content": f"What is {a} * 3?"}] for a in (12, 345)]

    def episodes():
        return generate(
            model, tokenizer, messages, num_generations=2, max_new_tokens=40, do_sample=True, seeds=[1, 2],
            environment=multi_turn.Environment.of(TASK),
        )  # fmt: skip

    kept = episodes()
    monkeypatch.setattr(
        multi_turn, "KeptTurns", lambda model, tok, prompts, g: multi_turn.Reprefilled(model, tok, prompts, g, "lean")
    )
    again = episodes()
    assert all(len(e) >= 2 for e in kept.episodes)  # the tool was called and the episodes went on
    assert kept.episodes == again.episodes
    assert torch.equal(kept.completion_ids, again.completion_ids)
    assert torch.equal(kept.loss_mask, again.loss_mask)
    assert torch.allclose(kept.sampler_logps, again.sampler_logps, atol=1e-4)
