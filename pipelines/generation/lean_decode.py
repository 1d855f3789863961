"""A lean sampling loop for small models on CPU: one prefill per distinct prompt, a shared KV cache.

`model.generate` re-runs the prompt for every completion of a group and spends a few milliseconds
of bookkeeping per token; at 135M parameters on 2 cores that bookkeeping is a large share of the
step. This loop prefills each prompt once and shares its KV cache with the G completions of its
group: on the sampling copy (sampling_copy.py) one copy per group that every completion attends
to (shared_prefix.py), elsewhere a copy per completion (`batch_repeat_interleave`). Per token it
does only what sampling needs: temperature, top-k, top-p, EOS tracking.

Different prompts of one batch usually open alike (system prompt, worked example, "What is "):
validation and evaluation decode dozens of them at once, and prefilling that opening once instead of
once per prompt is most of their prefill (`prefill`). Training's seeded rollouts keep one pass
over each whole prompt, so that what a prompt samples does not depend on the rounding of a split
set by the other prompts of its batch (data-parallel ranks see other batches).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch


def prompt_seed(seed: int, step: int, index: int) -> int:
    """The seed of one prompt's group of completions at one training step.

    Training samples each group from its own generator seeded by (run seed, step, the prompt's
    place in the step's global batch), so a group's completions do not depend on which other
    prompts share its batch: a data-parallel run, where each rank samples a slice of the batch,
    draws exactly what a single process draws (pipelines/grpo/distributed.py).

    >>> prompt_seed(0, 1, 2) == prompt_seed(0, 1, 2) != prompt_seed(0, 1, 3)
    True
    """
    digest = hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: what torch.Generator.manual_seed takes


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering, as `transformers` orders them.

    >>> filter_logits(torch.tensor([[1.0, 2.0, 3.0]]), 1.0, 2, 1.0).isinf().tolist()
    [[True, False, False]]
    """
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@dataclass
class Decoding:
    """What the decoding loop advances: the KV cache (with the prompts' keys and values once per
    group when `prefix` is set, else in the cache row by row), the attention mask and next position
    of each row, and the logits its next token is drawn from."""

    cache: Any
    prefix: Any  # shared_prefix.Prefix or None
    attention_mask: torch.Tensor
    next_position: torch.Tensor  # (rows, 1)
    logits: torch.Tensor  # (rows, vocabulary) fp32


@torch.no_grad()
def start(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_generations: int,
    pad_id: int,
    share_opening: bool,
) -> Decoding:
    """Prefill the prompts and fan each out to its group's `num_generations` rows."""
    from transformers import DynamicCache

    from pipelines.generation.shared_prefix import Prefix, enabled

    cache = DynamicCache()
    out, attention_mask, positions = prefill(
        model, input_ids, attention_mask, cache, pad_id=pad_id, share_opening=share_opening
    )
    # With shared-prefix attention (shared_prefix.py) the prompt's keys and values stay once per
    # group and the completions' own go to a fresh cache; otherwise the cache is repeated G times.
    prefix = (
        Prefix.from_cache(cache, attention_mask, num_generations) if num_generations > 1 and enabled(model) else None
    )
    if prefix is not None:
        cache = DynamicCache()
    if num_generations > 1:
        if prefix is None:
            cache.batch_repeat_interleave(num_generations)
        attention_mask = attention_mask.repeat_interleave(num_generations, dim=0)
        positions = positions.repeat_interleave(num_generations, dim=0)
    logits = out.logits[:, -1, :].float().repeat_interleave(num_generations, dim=0)
    return Decoding(cache, prefix, attention_mask, positions[:, -1:] + 1, logits)


@torch.no_grad()
def sample(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_generations: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generators: list[torch.Generator] | None = None,
    min_new_tokens: int = 0,
    share_opening: bool | None = None,
    turn_ends: TurnEnds | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B * G, T) completion ids for left-padded prompts, padded with `pad_id` after EOS, and when
    sampling, each token's log-probability under the distribution it was drawn from (after
    temperature, top-k, top-p and the min-length rule; 0 after EOS), else None.

    `generators`, one per completion row (`row_generators`), make each completion's draws its
    own: a row takes one vocabulary-sized block of noise per token it generates, so what it samples
    does not depend on the rest of the batch. Without them, noise comes from torch's global generator.
    `share_opening` prefills the prompts' common opening once (`prefill`); by default only without
    `generators`, whose promise it would bend at the rounding level. `turn_ends` lets a row go on
    after its EOS (a multi-turn episode's tool call, `decode`).
    """
    from pipelines.device import model_device

    device = model_device(model)  # prompts come from the tokenizer on the CPU; completions go back there
    state = start(
        model,
        input_ids.to(device),
        attention_mask.to(device),
        num_generations=num_generations,
        pad_id=pad_id,
        share_opening=generators is None if share_opening is None else share_opening,
    )
    return decode(
        model, state, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, generators=generators, min_new_tokens=min_new_tokens,
        turn_ends=turn_ends,
    )  # fmt: skip


class TurnEnds(Protocol):
    """Called when a row samples EOS: the tokens to feed it next (they are not sampled: a tool's reply
    and the template around it, which the row then reads), or None when the row is done. `turn` is
    what the row sampled since it last went on, EOS included; `room` how many tokens it has left."""

    def __call__(self, row: int, turn: list[int], room: int) -> list[int] | None: ...


@torch.no_grad()
def decode(
    model: Any,
    state: Decoding,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generators: list[torch.Generator] | None = None,
    min_new_tokens: int = 0,
    turn_ends: TurnEnds | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample up to `max_new_tokens` for every row of `state` (`sample`'s result).

    With `turn_ends`, a row whose turn calls a tool stays in the batch: the reply's tokens are fed to
    it one a step, beside the other rows' sampled ones (log-prob 0), and it samples again after them.
    Episodes so never wait for each other's turns, and their KV caches are never rebuilt.
    """
    logits, device = state.logits, state.logits.device
    rows = logits.size(0)
    if generators is not None and len(generators) != rows:
        raise ValueError(f"{len(generators)} generators for {rows} completions: pass one per completion row")
    result = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    # The sampler's own log-probs let training correct for the sampler not being the trained
    # model bit for bit (bf16 merged weights): TRL's importance-sampling correction, trainer.py.
    result_logps = torch.zeros((rows, max_new_tokens), device=device) if do_sample else None
    active = torch.arange(rows, device=device)  # rows still generating; finished rows leave the batch and the cache
    feeding: dict[int, list[int]] = {}  # row -> the tokens still to feed it (a tool's reply)
    turn_start = [0] * rows
    for step in range(max_new_tokens):
        if step < min_new_tokens:
            logits[:, eos_id] = float("-inf")  # as transformers' MinNewTokensLengthLogitsProcessor
        if do_sample:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            # argmax(p / Exp(1)) draws from p exactly (the exponential race), and is much cheaper
            # than torch.multinomial over a 49k vocabulary on CPU.
            token = (probs / _exponential_noise(probs, active, generators)).argmax(-1)
            result_logps[active, step] = probs.gather(-1, token[:, None]).squeeze(-1).log()
        else:
            token = logits.argmax(-1)
        fed = _feed(token, active, feeding, result_logps, step) if feeding else None
        result[active, step] = token
        alive = token != eos_id if fed is None else (token != eos_id) | fed
        if turn_ends is not None and not bool(alive.all()):
            _go_on(result, active, alive, step, max_new_tokens, turn_ends, turn_start, feeding)
        if not bool(alive.any()) or step + 1 == max_new_tokens:
            return result[:, : step + 1], None if result_logps is None else result_logps[:, : step + 1]
        if not bool(alive.all()):
            # Decoding is memory-bound here, but a smaller batch still saves ~15 ms a token on 2
            # cores, and a group's longest completion often runs alone for most of its tokens.
            keep = alive.nonzero().squeeze(-1)
            _select(state, keep)
            active, token = active[keep], token[keep]
        logits = _advance(model, state, token)
    return result[:, :0], None if result_logps is None else result_logps[:, :0]


def _feed(
    token: torch.Tensor, active: torch.Tensor, feeding: dict[int, list[int]], logps: torch.Tensor | None, step: int
) -> torch.Tensor:
    """Replace the sampled token of each row being fed by its next fed token (log-prob 0); which were fed."""
    fed = torch.zeros_like(token, dtype=torch.bool)
    for i, row in enumerate(active.tolist()):
        pending = feeding.get(row)
        if pending:
            token[i] = pending.pop(0)
            fed[i] = True
            if logps is not None:
                logps[row, step] = 0.0
            if not pending:
                del feeding[row]
    return fed


def _go_on(
    result: torch.Tensor,
    active: torch.Tensor,
    alive: torch.Tensor,
    step: int,
    budget: int,
    turn_ends: TurnEnds,
    turn_start: list[int],
    feeding: dict[int, list[int]],
) -> None:
    """Ask `turn_ends` about each row that just ended a turn; a row given tokens to read stays alive."""
    for i in (~alive).nonzero().squeeze(-1).tolist():
        row = int(active[i])
        reply = turn_ends(row, result[row, turn_start[row] : step + 1].tolist(), budget - step - 1)
        if reply:
            feeding[row] = list(reply)
            turn_start[row] = step + 1 + len(reply)
            alive[i] = True


def _select(state: Decoding, keep: torch.Tensor) -> None:
    """Keep only the rows `keep` (indices into the active rows) in the cache, the prefix and the masks."""
    if state.cache.get_seq_length():  # the shared-prefix suffix cache is empty before the first token
        state.cache.batch_select_indices(keep)
    if state.prefix is not None:
        state.prefix.select(state.prefix.group[keep])
    state.attention_mask, state.next_position = state.attention_mask[keep], state.next_position[keep]


def _advance(model: Any, state: Decoding, token: torch.Tensor) -> torch.Tensor:
    """Feed one token per active row; the next logits."""
    if state.prefix is not None:
        out = model(
            input_ids=token[:, None],
            position_ids=state.next_position,
            use_cache=True,
            shared_prefix=state.prefix,
            **cache_kwargs(model, state.cache),
        )
    else:
        state.attention_mask = torch.cat([state.attention_mask, torch.ones_like(state.attention_mask[:, :1])], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=state.attention_mask,
            position_ids=state.next_position,
            **cache_kwargs(model, state.cache),
            use_cache=True,
        )
    state.next_position = state.next_position + 1
    return out.logits[:, -1, :].float()


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The KV cache as `model`'s forward takes it: `cache=` since transformers renamed it (the old
    name warns there), `past_key_values=` before, where `cache=` is silently ignored (the image of
    the GPU machine has such a transformers: the prompt's cache went missing without an error)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_name(type(base)): cache}


@functools.cache
def _cache_name(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def last_positions(length: int, count: int = 1, device: torch.device | None = None) -> torch.Tensor:
    """`logits_to_keep` for the last `count` of `length` positions, as indices rather than a count.

    For a count, transformers slices `hidden_states[:, -count:]`: a view whose rows cannot be folded
    into one matrix, so for a weight that does not require grad (the sampling copy; a frozen
    lm_head under LoRA) `torch.matmul` expands the vocabulary x hidden weight to every row and copies
    it (3.6 GB and 3 s for 64 prompts on 2 cores, against 15 ms). Indices gather a contiguous tensor.

    >>> last_positions(5, 2).tolist()
    [3, 4]
    """
    return torch.arange(length - count, length, device=device)


def common_opening(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading tokens every left-padded prompt shares, leaving each at least one of its own
    (the last prompt token's logits start decoding).

    >>> common_opening(torch.tensor([[0, 5, 6, 7], [5, 6, 8, 9]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    2
    >>> common_opening(torch.tensor([[5, 6], [5, 6]]), torch.ones(2, 2, dtype=torch.long))
    1
    """
    rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask, strict=True)]
    shortest = min(len(r) for r in rows)
    same = torch.stack([r[:shortest] == rows[0][:shortest] for r in rows]).all(0)
    return min(int(same.int().cumprod(0).sum()), shortest - 1)


def prefill(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Any,
    *,
    pad_id: int,
    share_opening: bool = True,
    min_shared: int = 16,
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Run the prompts into `cache`: (output with the last position's logits, attention mask and
    position ids of what the cache now holds).

    With `share_opening`, when the prompts open with at least `min_shared` common tokens, that
    opening is run once and its keys and values copied to every row, then each prompt's own rest
    follows, left-padded after the opening: the pad sits between the two and is masked like any pad.
    """
    rows = input_ids.size(0)
    shared = common_opening(input_ids, attention_mask) if share_opening and rows > 1 else 0
    run, mask = input_ids, attention_mask
    if shared >= min_shared:
        tokens = [ids[keep.bool()] for ids, keep in zip(input_ids, attention_mask, strict=True)]
        model(
            input_ids=tokens[0][None, :shared],
            **cache_kwargs(model, cache),
            use_cache=True,
            logits_to_keep=last_positions(shared, device=input_ids.device),
        )
        cache.batch_repeat_interleave(rows)
        width = max(len(t) for t in tokens) - shared
        run = torch.full((rows, width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        ones = torch.ones(rows, shared, dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([ones, torch.zeros_like(run)], dim=1)
        for row, t in enumerate(tokens):
            own = t[shared:]
            run[row, width - len(own) :] = own
            mask[row, shared + width - len(own) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=run,
        attention_mask=mask,
        position_ids=positions[:, -run.size(1) :],
        **cache_kwargs(model, cache),
        use_cache=True,
        logits_to_keep=last_positions(run.size(1), device=run.device),
    )
    return out, mask, positions


def row_generators(seeds: list[int], num_generations: int) -> list[torch.Generator]:
    """One generator per completion row, `num_generations` per prompt seed, group after group."""
    return [
        torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(f"{seed}/{j}".encode()).digest()[:8], "little") >> 1
        )
        for seed in seeds
        for j in range(num_generations)
    ]


def _exponential_noise(
    probs: torch.Tensor, active: torch.Tensor, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """Exp(1) noise shaped like `probs` (one row per active completion), from each row's own generator if given.

    -log(U) with U uniform in [0, 1): E lies in (0, inf], so every ratio p / E is a finite number
    or 0 (a U of exactly 0 makes that one token lose, a 2^-24 effect). On 2 cores this takes
    1.3 ms for 8 rows of 49k against 7.2 ms for `Tensor.exponential_`, ~0.4 s of a 64-token step.
    (Drawing one uniform per row through the cumulative distribution is cheaper still, but a
    bf16-level change in the probabilities moves its boundaries, so data-parallel ranks, whose
    batches differ, stopped sampling what one process samples; the race does not have that
    sensitivity.)
    """
    if generators is None:
        return torch.rand_like(probs).log_().neg_()
    # The generators are CPU ones on every device: the same seed draws the same completion on a GPU
    # as on the CPU (up to the logits' rounding), at the cost of one copy of the noise a token.
    noise = torch.stack(
        [torch.rand(probs.size(1), dtype=probs.dtype, generator=generators[i]) for i in active.tolist()]
    )
    return noise.to(probs.device, non_blocking=True).log_().neg_()
