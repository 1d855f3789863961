"""Multi-turn rollouts: the model calls a task's tools between turns (verifiers/tools.py).

An episode: sample a turn; if it calls a tool (and turns are left), run the tool, append its reply
as a `tool` message and the assistant's next header, and sample again, until a turn calls no tool
(the answer), `max_turns`, or the token budget. Two ways to run a batch of them:

- `in_loop` (the lean backend): one decoding pass. A row whose turn ends in a call is fed the reply
  inside the loop, one token a step beside the rows still sampling, and samples on from its own
  generator; its KV cache is never rebuilt and no episode waits for the batch's slowest turn. A
  group's G episodes share the prompt's cache (shared-prefix decoding) as a single-turn group does.
- `turn_by_turn` (hf, vllm): a batch a turn; each later turn sends each going episode's whole context
  again as a prompt, seeded per (prompt seed, completion, turn).

Either way an episode does not depend on the batch it is in, so data-parallel ranks sample what one
process samples.

What training sees is one sequence per episode, prompt then every turn's tokens: the model's
tokens (`loss_mask` 1, with the sampler's log-probs) and the tool replies and template tokens
between them (`loss_mask` 0, log-prob 0), all attended. So the log-prob pass, the loss, the KL and
the entropy run as for one turn, and only the model's own tokens are trained. The judge and the
rewards read the last turn's text: the answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pipelines.generation.backends import LeanBackend, SamplingRequest, get_backend

_MARK, _SLOT = "\x00MODEL\x00", "\x00RESULT\x00"


@dataclass(frozen=True)
class Environment:
    """What an episode may do: a task's tools, its turn limit and each call's time limit."""

    tools: tuple[Callable[..., Any], ...]
    max_turns: int
    tool_timeout: float

    @classmethod
    def of(cls, task: Any) -> Environment | None:
        """The task's environment, or None for a task without tools (one turn, as always)."""
        if task is None or not getattr(task, "tools", ()):
            return None
        return cls(tuple(task.tools), task.max_turns, task.tool_timeout)


@dataclass
class Episode:
    tokens: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)  # 1 on the model's tokens
    logps: list[float] = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)
    answer: str = ""  # the last turn's text
    truncated: bool = False
    reported: bool = True  # every model turn came with the sampler's log-probs

    def add(self, tokens: list[int], trained: int, logps: list[float] | None = None) -> None:
        self.tokens += tokens
        self.trained += [trained] * len(tokens)
        self.logps += logps if logps is not None else [0.0] * len(tokens)
        self.reported &= logps is not None or not trained


class ToolTurn:
    """The tokens between a model turn's end-of-turn token and the next model turn: the chat
    template's own rendering of a `tool` message and of the assistant's header, read off the
    template once (what it adds after an assistant turn, with a placeholder for the result)."""

    def __init__(self, tokenizer: Any) -> None:
        from pipelines.verifiers.task import TaskError

        base = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}]
        before = tokenizer.apply_chat_template(base, tokenize=False)
        after = tokenizer.apply_chat_template(
            [*base, {"role": "tool", "content": _SLOT}], tokenize=False, add_generation_prompt=True
        )
        if not after.startswith(before) or _SLOT not in after:
            raise TaskError(
                "this tokenizer's chat template renders a `tool` message by rewriting the turns before it, so a "
                "tool's reply cannot be appended to an episode: use a model whose template renders tool messages "
                "(Qwen, Llama 3, SmolLM), or a task without tools"
            )
        closing = before[before.rindex(_MARK) + len(_MARK) :]  # what follows an assistant turn's text
        eos = tokenizer.eos_token or ""
        closing = closing[len(eos) :] if eos and closing.startswith(eos) else closing  # the model wrote EOS itself
        self.prefix, self.suffix = (closing + after[len(before) :]).split(_SLOT)
        self.tokenizer = tokenizer

    def tokens(self, result: str) -> list[int]:
        return self.tokenizer(self.prefix + result + self.suffix, add_special_tokens=False)["input_ids"]


def turn_seed(seed: int, completion: int, turn: int) -> int:
    """The seed of one episode's later turn: its prompt's seed, its place in the group, the turn.

    >>> turn_seed(7, 0, 1) == turn_seed(7, 0, 1) != turn_seed(7, 1, 1)
    True
    """
    digest = hashlib.sha256(f"{seed}/{completion}/turn-{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def run_episodes(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    request: SamplingRequest,
    backend: str,
    env: Environment,
) -> list[Episode]:
    """`request.num_generations` episodes per prompt, group after group (this module's docstring)."""
    if isinstance(get_backend(backend), LeanBackend):
        return in_loop(model, tokenizer, input_ids, attention_mask, request, env)
    return turn_by_turn(model, tokenizer, input_ids, attention_mask, request, backend, env)


def in_loop(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    request: SamplingRequest,
    env: Environment,
) -> list[Episode]:
    """Episodes on the lean loop in one decoding pass: a row that calls a tool is fed the reply and
    goes on sampling from its own generator while the others decode (lean_decode.decode's
    `turn_ends`), so no episode waits for the batch's slowest turn and no context is prefilled twice."""
    calls = ToolCalls(env, ToolTurn(tokenizer), tokenizer)
    sampled = LeanBackend().completions(model, tokenizer, input_ids, attention_mask, request, turn_ends=calls)
    ids, logps = sampled.ids.cpu(), None if sampled.logps is None else sampled.logps.cpu()
    return [
        calls.episode(row, ids[row], None if logps is None else logps[row], tokenizer.eos_token_id, request)
        for row in range(ids.size(0))
    ]


class ToolCalls:
    """lean_decode's `turn_ends` for episodes: at each turn's EOS, run the turn's tool call and hand back
    the reply's tokens (or None: an answer, the last turn, or no room to read the reply and answer),
    remembering each turn; then `episode` lays a row's tokens out as its turns."""

    def __init__(self, env: Environment, between: ToolTurn, tokenizer: Any) -> None:
        self.env, self.between, self.tokenizer = env, between, tokenizer
        self.turns: dict[int, list[dict[str, Any]]] = {}  # row -> its turns that called a tool
        self.lengths: dict[int, list[tuple[int, int]]] = {}  # row -> (turn tokens, reply tokens) per call
        self.cut: set[int] = set()  # rows whose reply did not fit

    def __call__(self, row: int, turn: list[int], room: int) -> list[int] | None:
        from pipelines.verifiers.tools import call_tool

        done = self.turns.setdefault(row, [])
        if len(done) + 1 >= self.env.max_turns:
            return None  # the last turn: what it says is the answer
        text = self.tokenizer.decode(turn, skip_special_tokens=True)
        result = call_tool(self.env.tools, text, self.env.tool_timeout)
        if result is None:
            return None  # no call: this turn was the answer
        done.append({"text": text, **result.as_dict()})
        reply = self.between.tokens(result.text)
        if len(reply) >= room:
            self.cut.add(row)  # no room left for the model to read the reply and answer
            return None
        self.lengths.setdefault(row, []).append((len(turn), len(reply)))
        return reply

    def episode(
        self, row: int, ids: torch.Tensor, logps: torch.Tensor | None, eos: int, request: SamplingRequest
    ) -> Episode:
        """Row `row`'s tokens as an Episode: each called turn and its reply, then the last turn."""
        episode, at = Episode(), 0
        for turn_length, reply_length in self.lengths.get(row, []):
            span = slice(at, at + turn_length)
            episode.add(ids[span].tolist(), 1, None if logps is None else logps[span].tolist())
            at += turn_length
            episode.add(ids[at : at + reply_length].tolist(), 0)
            at += reply_length
        episode.turns = list(self.turns.get(row, []))
        # The last turn: an answer, the last of max_turns, one that ran out of room, or one whose call's
        # reply did not fit (already in `turns`, with its call and reply).
        last = slice(at, None)
        answered = _take_turn(episode, ids[last], None if logps is None else logps[last], eos, request, self.tokenizer)
        if row in self.cut:
            episode.truncated = True
        elif answered is not None:
            episode.turns.append({"text": episode.answer})
        return episode


def turn_by_turn(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    request: SamplingRequest,
    backend: str,
    env: Environment,
) -> list[Episode]:
    """Episodes through any backend, one batch a turn: each later turn sends every going episode's whole
    context (prompt, turns, replies) again as a prompt (the hf and vllm backends; a vLLM server keeps
    its own prefix cache)."""
    G, eos = request.num_generations, tokenizer.eos_token_id
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
    episodes = [Episode() for _ in range(len(prompts) * G)]
    between = ToolTurn(tokenizer)
    chosen = get_backend(backend)
    active = list(range(len(episodes)))
    for turn in range(env.max_turns):
        if turn == 0:
            sampled = chosen.completions(model, tokenizer, input_ids, attention_mask, request)
        else:
            room = max(request.max_new_tokens - len(episodes[i].tokens) for i in active)
            seeds = None if request.seeds is None else [turn_seed(request.seeds[i // G], i % G, turn) for i in active]
            asked = replace(request, num_generations=1, max_new_tokens=room, seeds=seeds, min_new_tokens=0)
            ids, mask = _left_padded([prompts[i // G] + episodes[i].tokens for i in active], tokenizer.pad_token_id)
            sampled = chosen.completions(model, tokenizer, ids, mask, asked)
        out, logps = sampled.ids.cpu(), None if sampled.logps is None else sampled.logps.cpu()
        calling = []
        for row, i in enumerate(active):
            text = _take_turn(episodes[i], out[row], None if logps is None else logps[row], eos, request, tokenizer)
            if text is not None and turn + 1 < env.max_turns:
                calling.append(i)
            elif text is not None:
                episodes[i].turns.append({"text": episodes[i].answer})
        active = [i for i in calling if _call_tool(episodes[i], env, between, request.max_new_tokens)]
        if not active:
            break
    return episodes


def _take_turn(
    episode: Episode, ids: torch.Tensor, logps: torch.Tensor | None, eos: int, request: Any, tokenizer: Any
) -> str | None:
    """Append one sampled turn (up to its EOS, within the budget); its text, or None when it ran out of room."""
    room = request.max_new_tokens - len(episode.tokens)
    tokens = ids.tolist()[:room]
    ended = eos in tokens
    if ended:
        tokens = tokens[: tokens.index(eos) + 1]
    episode.add(tokens, 1, None if logps is None else logps[: len(tokens)].tolist())
    episode.answer = tokenizer.decode(tokens, skip_special_tokens=True)
    if not ended:
        episode.truncated = True
        episode.turns.append({"text": episode.answer})
        return None
    return episode.answer


def _call_tool(episode: Episode, env: Environment, between: ToolTurn, budget: int) -> bool:
    """Run the last turn's tool call and append its reply; True when the episode goes on."""
    from pipelines.verifiers.tools import call_tool

    result = call_tool(env.tools, episode.answer, env.tool_timeout)
    episode.turns.append({"text": episode.answer, **(result.as_dict() if result else {})})
    if result is None:
        return False  # no call: this turn was the answer
    reply = between.tokens(result.text)
    if len(episode.tokens) + len(reply) >= budget:
        episode.truncated = True  # no room left for the model to read the reply and answer
        return False
    episode.add(reply, 0)
    return True


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def transcript(turns: list[dict[str, Any]]) -> str:
    """An episode as text: each turn, and each tool reply marked as such.

    >>> print(transcript([{"text": "<call>", "result": "42", "error": False}, {"text": "#### 42"}]))
    <call>
    [tool] 42
    #### 42
    """
    lines = []
    for turn in turns:
        lines.append(turn.get("text", ""))
        if "result" in turn:
            lines.append(f"[tool{' error' if turn.get('error') else ''}] {turn['result']}")
    return "\n".join(lines)


def episode_counts(turns: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(model turns, tool calls, tool errors) of one episode."""
    calls = [t for t in turns if "result" in t]
    return len(turns), len(calls), sum(bool(t.get("error")) for t in calls)


def lay_out(episodes: list[Episode], pad_id: int) -> dict[str, Any]:
    """The episodes as a rollout's completion tensors (right-padded) and per-episode records."""
    width = max(1, max(len(e.tokens) for e in episodes))
    shape = (len(episodes), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    attended, trained, logps = (
        torch.zeros(shape, dtype=torch.long),
        torch.zeros(shape, dtype=torch.long),
        torch.zeros(shape),
    )
    for i, e in enumerate(episodes):
        n = len(e.tokens)
        ids[i, :n] = torch.tensor(e.tokens, dtype=torch.long)
        attended[i, :n] = 1
        trained[i, :n] = torch.tensor(e.trained, dtype=torch.long)
        logps[i, :n] = torch.tensor(e.logps)
    return {
        "completion_ids": ids,
        "completion_mask": attended,
        "loss_mask": trained,
        # (none when a backend did not report them: a zero would read as probability 1)
        "sampler_logps": logps if all(e.reported for e in episodes) else None,
        "truncated": torch.tensor([e.truncated for e in episodes], dtype=torch.bool),
        "texts": [e.answer for e in episodes],
        "episodes": [e.turns for e in episodes],
    }
