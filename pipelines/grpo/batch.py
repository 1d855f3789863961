"""One step's batch: prompts drawn, groups of completions sampled and scored, flat groups handled.

Dynamic sampling (DAPO) lives here: groups whose rewards are all equal carry no gradient, so with
`train.dynamic_sampling` they are dropped and more prompts are drawn, a few rounds at most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.config import Config
from pipelines.generation.lean_decode import prompt_seed
from pipelines.generation.multi_turn import Environment
from pipelines.generation.rollout import Rollout, concat, generate
from pipelines.grpo import distributed
from pipelines.grpo.advantages import combine_rewards, group_advantages
from pipelines.grpo.prompt_sampler import PromptSampler
from pipelines.grpo.reward_runner import score
from pipelines.verifiers.task import Task


@dataclass
class Batch:
    rows: list[dict[str, Any]]  # this process's prompts (all of them when there is one process)
    rollout: Rollout  # this process's completions, group after group
    per_function: torch.Tensor  # (completions of the whole batch, reward functions), NaN where a function said None
    local: torch.Tensor  # (completions of the whole batch,) bool: the ones this process sampled
    frac_zero_std: float  # share of all sampled groups whose rewards were all equal
    rounds: int
    prompts_sampled: int = 0  # prompts generated for this batch, over all rounds
    signal_groups: int = 0  # groups in the batch trained on whose rewards differ (carry a gradient)


def sample_batch(
    model: Any,
    tokenizer: Any,
    sampler: PromptSampler,
    cfg: Config,
    autocast: bool | None = None,
    step: int = 0,
    world: distributed.World = distributed.SINGLE,
    signal_rate: float = 1.0,
    task: Task | None = None,
) -> Batch:
    """Groups of completions for `prompts_per_step` prompts, scored.

    Every process draws the same prompts and samples its own slice of them, each group from its
    own seed (generation/lean_decode.py's prompt_seed), then the whole batch's rewards are gathered on every process.
    With dynamic sampling (DAPO), groups whose rewards are all equal are dropped (they carry no
    gradient) and more prompts are sampled, for at most `max_resample_rounds` extra rounds. Each
    round draws `oversample(t, signal_rate)` prompts per prompt still missing (`signal_rate`: the
    share of groups with signal at the previous step); groups beyond the batch are dropped.
    Every group's outcome (flat or not) goes back to the sampler, which with selective rollouts
    skips prompts that were flat at their latest visits (prompt_sampler.py).
    """
    t, G = cfg.train, cfg.train.num_generations
    weights = torch.tensor([s.weight for s in t.rewards])
    rows_kept: list[dict[str, Any]] = []
    rollouts: list[Rollout] = []
    scores: list[torch.Tensor] = []
    local: list[torch.Tensor] = []
    kept = seen = zero = rounds = 0
    factor = oversample(t, signal_rate) if t.dynamic_sampling else 1.0
    while True:
        need = t.prompts_per_step - kept
        rows = sampler.take(math.ceil(need * factor - 1e-9))  # the same prompts in every process
        seeds = [prompt_seed(t.seed, step, seen + i) for i in range(len(rows))]
        part = world.shard(len(rows))  # whole groups: each process scores the groups it sampled
        rollout, mine = _sample_and_score(model, tokenizer, rows[part], seeds[part], cfg, autocast, task)
        per_fn = world.gather(mine)
        is_mine = torch.zeros(len(rows) * G, dtype=torch.bool)
        is_mine[part.start * G : part.stop * G] = True
        _, group_std = group_advantages(combine_rewards(per_fn, weights), G, "none")
        signal = group_std > 1e-6
        sampler.record(rows, (~signal).tolist())  # every process the same: rewards are gathered
        seen += len(rows)
        zero += int((~signal).sum())
        if not t.dynamic_sampling:
            rows_kept, rollouts, scores, local, kept = rows[part], [rollout], [per_fn], [is_mine], len(rows)
            break
        signal &= signal.cumsum(0) <= need  # the first `need` groups with signal, in the order drawn
        keep = signal.repeat_interleave(G)
        rows_kept += [r for r, s in zip(rows[part], signal[part].tolist(), strict=True) if s]
        rollouts.append(rollout.select(keep[is_mine]))
        scores.append(per_fn[keep])
        local.append(is_mine[keep])
        kept += int(signal.sum())
        if kept >= t.prompts_per_step or rounds >= t.max_resample_rounds:
            break
        rounds += 1
    if not kept:  # every group was flat: train on the last one (zero advantage, zero gradient)
        rows_kept, rollouts, scores, local = rows[part], [rollout], [per_fn], [is_mine]
    return Batch(
        rows_kept,
        concat(rollouts, tokenizer.pad_token_id),
        torch.cat(scores),
        torch.cat(local),
        zero / max(seen, 1),
        rounds,
        seen,
        kept if t.dynamic_sampling else seen - zero,
    )


def oversample(t: Any, signal_rate: float) -> float:
    """Prompts to draw per prompt still missing in a dynamic-sampling round.

    >>> from types import SimpleNamespace as NS
    >>> oversample(NS(dynamic_sampling_oversample="auto"), 0.5), oversample(NS(dynamic_sampling_oversample="auto"), 0.1)
    (2.0, 4.0)
    >>> oversample(NS(dynamic_sampling_oversample=1.5), 0.1)
    1.5
    """
    if t.dynamic_sampling_oversample != "auto":
        return float(t.dynamic_sampling_oversample)
    return 1.0 / min(1.0, max(signal_rate, 0.25))


def _sample_and_score(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    seeds: list[int],
    cfg: Config,
    autocast: bool | None,
    task: Task | None = None,
) -> tuple[Rollout, torch.Tensor]:
    """This process's groups for `rows`, and their rewards (completions, reward functions).

    With several processes a round can draw fewer prompts than there are processes (a dynamic-
    sampling round that fills the last places): a process without rows samples nothing and still
    takes part in the gather.
    """
    t, G = cfg.train, cfg.train.num_generations
    if not rows:
        return Rollout.empty(G), torch.zeros(0, len(t.rewards))
    rollout = generate(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        num_generations=G,
        max_new_tokens=t.max_completion_length,
        do_sample=True,
        temperature=t.temperature,
        top_p=t.top_p,
        top_k=t.top_k,
        bf16=t.bf16 if autocast is None else autocast,
        backend=cfg.runtime.rollout_backend,
        seeds=seeds,
        min_new_tokens=t.min_completion_length,
        environment=Environment.of(task),  # a task with tools: multi-turn episodes (multi_turn.py)
    )
    scores, _ = score(
        t.rewards,
        rows,
        rollout.texts,
        G,
        timeout=t.reward_timeout,
        extra={"completion_ids": rollout.completion_token_lists(), "max_completion_length": t.max_completion_length},
        task=task,
    )
    return rollout, scores
