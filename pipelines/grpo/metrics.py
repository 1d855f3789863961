"""What a training step reports, named as the field knows them (TRL's names), and the run's warnings."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import torch

from pipelines.grpo import distributed
from pipelines.grpo.batch import Batch
from pipelines.grpo.loss import LossStats


def step_metrics(
    *,
    batch: Batch,
    rewards: torch.Tensor,
    group_std: torch.Tensor,
    reward_names: list[str],
    loss: float,
    share: float,
    stats: LossStats,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    sampler_stats: dict[str, float],
    skipped: int,
    grad_norm: float,
    learning_rate: float,
    elapsed: float,
    generation_time: float,
    world: distributed.World,
    tools: bool = False,
) -> dict[str, float]:
    """One step's metrics over all processes.

    Rewards are the whole batch's already; per-token and per-completion figures are averaged over
    processes, and the slowest one's time counts (so budgets agree).
    """
    rollout = batch.rollout
    lengths = rollout.lengths.float()
    fn_means = batch.per_function.nanmean(dim=0).tolist()
    tokens = float(mask.sum())
    per_token = world.average(
        {
            "kl": stats.kl,
            "low": stats.clip_low,
            "high": stats.clip_high,
            "region": stats.clip_region,
            "entropy": float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1)),
        },
        weight=tokens,
    )
    per_completion = world.average(
        {"length": float(lengths.mean()), "clipped": float(rollout.truncated.float().mean())},
        weight=float(lengths.numel()),
    )
    return {
        "loss": world.sum(loss * share),
        # (NaN marks a completion no reward function scored, and a group without two scored ones)
        "reward": float(rewards.nanmean()),
        "reward_std": float(group_std.nanmean()),
        **{f"rewards/{name}/mean": m for name, m in zip(reward_names, fn_means, strict=True)},
        "frac_reward_zero_std": batch.frac_zero_std,
        "resample_rounds": float(batch.rounds),
        "prompts_sampled": float(batch.prompts_sampled),
        "prompts_skipped": float(skipped),  # selective rollouts
        "kl": per_token["kl"],
        "clip_ratio/low_mean": per_token["low"],
        "clip_ratio/high_mean": per_token["high"],
        "clip_ratio/region_mean": per_token["region"],
        "entropy": per_token["entropy"],
        **_knob_metrics(stats, share, world, weight=tokens),
        **_sampler_metrics(sampler_stats, world, weight=tokens),
        "completions/mean_length": per_completion["length"],
        "completions/clipped_ratio": per_completion["clipped"],
        "grad_norm": grad_norm,  # before clipping, of the last of the mu updates
        "learning_rate": learning_rate,
        "step_time": elapsed,
        "generation_time": generation_time,
        "tokens_per_second": world.sum(float(lengths.sum())) / elapsed,
        **(episode_metrics(rollout, world) if tools else {}),
    }


def episode_metrics(rollout: Any, world: distributed.World) -> dict[str, float]:
    """Turns, tool calls and tool errors per episode, over all processes (a task with tools)."""
    from pipelines.generation.multi_turn import episode_counts

    counts = [episode_counts(turns) for turns in rollout.episodes or []]
    n = len(counts)
    means = [sum(c[k] for c in counts) / n if n else 0.0 for k in range(3)]
    averaged = world.average({"turns": means[0], "calls": means[1], "errors": means[2]}, weight=float(n))
    return {
        "tools/turns_per_episode": averaged["turns"],
        "tools/calls_per_episode": averaged["calls"],
        "tools/errors_per_episode": averaged["errors"],
    }


def flat_groups_warning(step: int, batch: Batch, t: Any) -> str | None:
    """A warning when most groups trained on had equal rewards (near-zero loss), else None.

    With dynamic sampling the flat groups are dropped and replaced, so it warns only when the
    batch stayed short of groups with signal after `max_resample_rounds` rounds.

    >>> from types import SimpleNamespace as NS
    >>> flat = NS(frac_zero_std=0.8, signal_groups=2, rounds=4)
    >>> flat_groups_warning(5, flat, NS(dynamic_sampling=False, prompts_per_step=10)).split("; ")
    ['step 5: 80% of groups had equal rewards, so the loss is near zero', 'raise train.num_generations or \
train.temperature, use harder prompts, or set train.dynamic_sampling']
    >>> flat_groups_warning(5, flat, NS(dynamic_sampling=True, prompts_per_step=2)) is None
    True
    >>> print(flat_groups_warning(5, flat, NS(dynamic_sampling=True, prompts_per_step=10)).split("; ")[0])
    step 5: 2 of 10 groups had different rewards after 4 resampling rounds (80% of the sampled groups were flat)
    """
    if not t.dynamic_sampling:
        if batch.frac_zero_std < 0.75:
            return None
        return (
            f"step {step}: {batch.frac_zero_std:.0%} of groups had equal rewards, so the loss is near zero; "
            "raise train.num_generations or train.temperature, use harder prompts, or set train.dynamic_sampling"
        )
    if batch.signal_groups > 0.25 * t.prompts_per_step:
        return None
    return (
        f"step {step}: {batch.signal_groups} of {t.prompts_per_step} groups had different rewards after "
        f"{batch.rounds} resampling rounds ({batch.frac_zero_std:.0%} of the sampled groups were flat); "
        "raise train.max_resample_rounds, train.num_generations or train.temperature, or use harder prompts"
    )


def truncation_warning(history: list[dict[str, float]], t: Any) -> str | None:
    """A warning when most completions start running to the length limit, else None.

    Seen on the demo's task mix at lr 2e-4 without KL past ~35 steps: the policy stops emitting EOS
    after its answer, rambles to the limit while the `#### N` inside still earned the accuracy
    reward (it read any `####` line then; it is the judge's strict verdict now), entropy climbs
    from ~0.02 to ~1 and held-out strict accuracy falls to near zero.
    Said when the clipped share first reaches half, and every 10 steps while it stays there.
    """
    clipped = [h["completions/clipped_ratio"] for h in history[-2:]]  # the previous step and this one
    if not clipped or clipped[-1] < 0.5 or (len(clipped) > 1 and clipped[-2] >= 0.5 and len(history) % 10):
        return None
    h = history[-1]
    return (
        f"step {int(h['step'])}: {clipped[-1]:.0%} of completions ran to train.max_completion_length "
        f"({t.max_completion_length} tokens) without EOS (entropy {h['entropy']:.2f}). If the task's answers are "
        "shorter, the policy is drifting: lower train.learning_rate, set train.beta > 0 or "
        "train.mask_truncated_completions=true, or add the `overlong` reward; else raise train.max_completion_length"
    )


def _knob_metrics(stats: LossStats, share: float, world: distributed.World, weight: float) -> dict[str, float]:
    """TRL's figures for the optional loss terms, only where they are on (the same on every process)."""
    out: dict[str, float] = {}
    if stats.cispo_clip is not None:
        out["cispo_clip_ratio"] = world.average({"c": stats.cispo_clip}, weight=weight)["c"]
    if stats.policy_loss is not None and stats.entropy_bonus is not None:
        out["policy_loss"] = world.sum(stats.policy_loss * share)  # the loss before the entropy bonus
        out["entropy_bonus"] = world.average({"h": stats.entropy_bonus}, weight=weight)["h"]
    return out


def _sampler_metrics(stats: dict[str, float], world: distributed.World, weight: float) -> dict[str, float]:
    """The sampler-mismatch figures over all processes: means weighted by tokens, extremes as extremes."""
    out = world.average({k: v for k, v in stats.items() if k.endswith("/mean")}, weight=weight) if stats else {}
    for key, value in stats.items():
        # a process without tokens (it kept no group) has no extremes: it must not pull them to 0
        if key.endswith("/max"):
            out[key] = world.max(value if weight or world.size == 1 else -math.inf)
        elif key.endswith("/min"):
            out[key] = -world.max(-value if weight or world.size == 1 else -math.inf)
    return out


def history_csv(history: list[dict[str, float]], correctness: str | None = None) -> str:
    """plots/train.csv: one row a step, every metric a column (what `dvc plots` draws), and
    `correct`, the task's correctness reward's mean under one name whatever the task.

    >>> history_csv([{"step": 1, "rewards/countdown/mean": 0.5}], "countdown").splitlines()
    ['step,rewards/countdown/mean,correct', '1,0.5,0.5']
    """
    if not history:
        return ""
    key = f"rewards/{correctness}/mean"
    rows = [{**h, "correct": h[key]} if key in h else h for h in history]
    buf = io.StringIO()
    fields = ["step", *(k for k in rows[-1] if k != "step")]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def scores_csv(scores: list[Any], history: list[dict[str, float]]) -> str:
    """plots/val.csv: one row per validation (step, training wall time, accuracies, format rate)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "wall_time", "accuracy", "lenient_accuracy", "format_rate", "reward"])
    wall = {int(h["step"]): h["wall_time"] for h in history}
    for s in scores:
        reward = "" if s.reward is None else f"{s.reward:.6g}"
        row = [s.step, f"{wall.get(s.step, 0.0):.6g}", f"{s.accuracy:.6g}", f"{s.lenient_accuracy:.6g}"]
        writer.writerow([*row, f"{s.format_rate:.6g}", reward])
    return buf.getvalue()


def on_policy_knobs_warning(t: Any) -> str | None:
    """A warning when knobs that only shape importance ratios away from 1 are set on policy, else None.

    With num_iterations 1 the old log-probs are the new ones detached, so every ratio is exactly 1:
    delta's cap, cispo's capped weight and sapo's gate then give the plain objective's gradient
    (cispo dapo's, sapo grpo's). A user who set them expects them to act, so say it once.
    """
    if t.num_iterations > 1:
        return None
    inert = [f"train.delta={t.delta:g}"] if t.delta is not None else []
    if t.loss_type == "cispo":
        inert.append("train.loss_type=cispo (trains as dapo here)")
    elif t.loss_type == "sapo":
        inert.append("train.loss_type=sapo (trains as grpo here)")
    if not inert:
        return None
    return (
        f"{' and '.join(inert)} only act on importance ratios away from 1, and with train.num_iterations=1 every "
        "ratio is exactly 1 (each batch is trained on once, by the policy that sampled it); set "
        "train.num_iterations to 2 or more for them to act"
    )
