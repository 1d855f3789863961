"""Episodes on the lean loop (multi_turn.in_loop): a row that calls a tool is fed the reply inside the
decoding loop and goes on, and what it samples is what a turn-by-turn run samples from the whole context."""

from __future__ import annotations

import pytest
import torch

from pipelines.generation import multi_turn
from pipelines.generation.backends import SamplingRequest
from pipelines.verifiers import tools
from pipelines.verifiers.calculator_task import TASK

ANSWER = tools.ToolResult({"name": "calculator", "arguments": {}}, "42", False, 0.0)


@pytest.fixture
def tiny(tiny_reference, monkeypatch):
    """The tiny random model, made to end a turn about 1 token in 8, and a tool that always answers 42
    (a random model writes no tool call of its own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_reference)
    model = AutoModelForCausalLM.from_pretrained(tiny_reference).eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight, head.bias.data = model.lm_head.weight, torch.zeros(head.out_features)
    head.bias.data[tokenizer.eos_token_id] = 9.5
    model.lm_head = head
    monkeypatch.setattr(tools, "call_tool", lambda *a: ANSWER)
    return model, tokenizer


def _inputs(tokenizer, questions):
    from pipelines.generation.rollout import render_prompts

    tokenizer.padding_side = "left"
    rendered = render_prompts(tokenizer, [[{"role": "user", "content": q}] for q in questions], TASK.tools)
    encoded = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    return encoded["input_ids"], encoded["attention_mask"]


def test_greedy_episodes_in_the_loop_equal_turn_by_turn_episodes(tiny):
    model, tokenizer = tiny
    ids, mask = _inputs(tokenizer, ["What is 12 * 3?", "What is 345 * 3?", "What is 6 * 7?"])
    request = SamplingRequest(num_generations=1, max_new_tokens=60, do_sample=False)
    env = multi_turn.Environment.of(TASK)
    looped = multi_turn.in_loop(model, tokenizer, ids, mask, request, env)
    stepped = multi_turn.turn_by_turn(model, tokenizer, ids, mask, request, "lean", env)
    assert any(len(e.turns) >= 2 for e in looped)  # the tool was called and episodes went on
    for a, b in zip(looped, stepped, strict=True):
        assert (a.tokens, a.trained, a.turns, a.truncated) == (b.tokens, b.trained, b.turns, b.truncated)


def test_an_episode_samples_the_same_whatever_else_is_in_its_batch(tiny):
    """Each row draws from its own generator at every step, replies included: a rank that samples a
    slice of the batch samples what one process samples."""
    model, tokenizer = tiny
    env = multi_turn.Environment.of(TASK)
    request = SamplingRequest(num_generations=2, max_new_tokens=48, do_sample=True, seeds=[7, 8])
    ids, mask = _inputs(tokenizer, ["What is 12 * 3?", "What is 345 * 3?"])
    together = multi_turn.in_loop(model, tokenizer, ids, mask, request, env)
    alone_ids, alone_mask = _inputs(tokenizer, ["What is 345 * 3?"])
    alone = multi_turn.in_loop(model, tokenizer, alone_ids, alone_mask, SamplingRequest(
        num_generations=2, max_new_tokens=48, do_sample=True, seeds=[8]), env)  # fmt: skip
    assert any(len(e.turns) >= 2 for e in together)
    for a, b in zip(together[2:], alone, strict=True):
        assert (a.tokens, a.turns) == (b.tokens, b.turns)
        assert torch.allclose(torch.tensor(a.logps), torch.tensor(b.logps), atol=1e-5)
    for episode in together:  # the replies are not the model's: no log-prob, no loss
        reply = [lp for lp, trained in zip(episode.logps, episode.trained, strict=True) if not trained]
        assert reply == [0.0] * len(reply)
        assert all(lp < 0 for lp, trained in zip(episode.logps, episode.trained, strict=True) if trained)


def test_a_reply_that_does_not_fit_ends_the_episode_truncated(tiny):
    model, tokenizer = tiny
    ids, mask = _inputs(tokenizer, ["What is 12 * 3?"])
    request = SamplingRequest(num_generations=4, max_new_tokens=24, do_sample=True, seeds=[3])
    long_reply = tools.ToolResult({"name": "calculator", "arguments": {}}, "4 2 " * 40, False, 0.0)
    tools_call = tools.call_tool
    try:
        tools.call_tool = lambda *a: long_reply
        episodes = multi_turn.in_loop(model, tokenizer, ids, mask, request, multi_turn.Environment.of(TASK))
    finally:
        tools.call_tool = tools_call
    called = [e for e in episodes if e.turns and "result" in e.turns[0]]
    assert called, "a turn ended within the budget and called the tool"
    for episode in called:
        assert episode.truncated and len(episode.turns) == 1
        assert all(episode.trained)  # the reply that did not fit was never appended
