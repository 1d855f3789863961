"""Stage 3, train: GRPO on the pinned reference (LoRA adapter or full fine-tuning).

One flat loop: sample a group of completions per prompt -> score them with the verifiers ->
group-relative advantages -> `num_iterations` clipped policy-gradient updates -> log -> checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.config import Config
from pipelines.grpo import checkpoint, distributed, policy
from pipelines.grpo.advantages import advantages_from_rewards, combine_rewards, group_advantages
from pipelines.grpo.loss import grpo_loss
from pipelines.grpo.rollout import Rollout, concat, generate, token_logps
from pipelines.grpo.rollout_model import RolloutModel
from pipelines.grpo.sampler import PromptSampler
from pipelines.grpo.sampling import prompt_seed
from pipelines.grpo.sampling_correction import importance_weights
from pipelines.grpo.scoring import score
from pipelines.grpo.tracking import RunLogger
from pipelines.io import read_jsonl, staged_dir, write_json, write_text
from pipelines.models import set_threads
from pipelines.paths import Paths
from pipelines.plots import training_curves
from pipelines.snapshot import verify


@dataclass
class TrainResult:
    steps: int
    final_reward: float
    run_id: str | None
    resumed_from: int = 0


@dataclass
class Batch:
    rows: list[dict[str, Any]]  # this process's prompts (all of them when there is one process)
    rollout: Rollout  # this process's completions, group after group
    per_function: torch.Tensor  # (completions of the whole batch, reward functions), NaN where a function said None
    local: torch.Tensor  # (completions of the whole batch,) bool: the ones this process sampled
    frac_zero_std: float  # share of all sampled groups whose rewards were all equal
    rounds: int
    prompts_sampled: int = 0  # prompts generated for this batch, over all rounds


def sample_batch(
    model: Any, tokenizer: Any, sampler: PromptSampler, cfg: Config, autocast: bool | None = None,
    step: int = 0, world: distributed.World = distributed.SINGLE, signal_rate: float = 1.0,
) -> Batch:
    """Groups of completions for `prompts_per_step` prompts, scored.

    Every process draws the same prompts and samples its own slice of them, each group from its
    own seed (sampling.prompt_seed), then the whole batch's rewards are gathered on every process.
    With dynamic sampling (DAPO), groups whose rewards are all equal are dropped (they carry no
    gradient) and more prompts are sampled, for at most `max_resample_rounds` extra rounds. Each
    round draws `oversample(t, signal_rate)` prompts per prompt still missing (`signal_rate`: the
    share of groups with signal at the previous step); groups beyond the batch are dropped.
    Every group's outcome (flat or not) goes back to the sampler, which with selective rollouts
    skips prompts that were flat at their latest visits (sampler.py).
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
        rollout = generate(
            model, tokenizer, [r["prompt"] for r in rows[part]], num_generations=G, max_new_tokens=t.max_completion_length,
            do_sample=True, temperature=t.temperature, top_p=t.top_p, top_k=t.top_k,
            bf16=t.bf16 if autocast is None else autocast, backend=cfg.runtime.rollout_backend, seeds=seeds[part],
            min_new_tokens=t.min_completion_length,
        )
        mine, _ = score(
            t.rewards, rows[part], rollout.texts, G, timeout=t.reward_timeout,
            extra={"completion_ids": rollout.completion_token_lists(), "max_completion_length": t.max_completion_length},
        )
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
        rows_kept, concat(rollouts, tokenizer.pad_token_id), torch.cat(scores), torch.cat(local), zero / max(seen, 1), rounds, seen
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


def lr_schedule(optimizer: torch.optim.Optimizer, t: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedule named by `train.lr_scheduler`, warmup included, one step per optimiser step.

    The schedule spans `steps` x `num_iterations` optimiser steps, so a run that stops early on
    `time_budget_s` ends before the decay does. Its position is in the checkpoint (resume is exact).

    >>> from types import SimpleNamespace as NS
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> sched = lr_schedule(opt, NS(lr_scheduler="linear", warmup_steps=0, steps=4, num_iterations=1))
    >>> rates = []
    >>> for _ in range(4):
    ...     rates.append(sched.get_last_lr()[0]); opt.step(); sched.step()
    >>> rates
    [1.0, 0.75, 0.5, 0.25]
    """
    from transformers import get_scheduler

    name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps * t.num_iterations)


def fingerprint(cfg: Config, reference_sha: str, train_bytes: bytes) -> str:
    """What must be equal for a checkpoint to be resumed: training config, reference and data."""
    # Not the number of processes: a data-parallel run makes the same updates as one process.
    train = cfg.train.model_dump(exclude={"num_processes"})
    payload = json.dumps({"train": train, "ref": reference_sha}, sort_keys=True).encode()
    return hashlib.sha256(payload + hashlib.sha256(train_bytes).digest()).hexdigest()


def run(cfg: Config, paths: Paths, log_to_mlflow: bool = True) -> TrainResult:
    """Train; with `train.num_processes > 1`, in that many processes under torchrun (distributed.py)."""
    if cfg.train.num_processes > 1 and not distributed.under_torchrun():
        return TrainResult(**distributed.launch(cfg, paths, log_to_mlflow))
    with distributed.world(cfg.train) as world:
        return train(cfg, paths, world, log_to_mlflow)


def train(cfg: Config, paths: Paths, world: distributed.World = distributed.SINGLE, log_to_mlflow: bool = True) -> TrainResult:
    """The training loop of one process (rank `world.rank` of `world.size`)."""
    from tqdm.auto import tqdm

    t, G = cfg.train, cfg.train.num_generations
    set_threads(cfg.runtime.num_threads)
    torch.manual_seed(t.seed)
    manifest = verify(paths.reference_dir)  # the reference must be exactly the pinned one
    model, tokenizer, reference = policy.build(cfg, paths)
    params = policy.trainable_parameters(model)
    world.broadcast(params)  # every process starts from rank 0's weights
    # Sampling runs on a merged copy (bf16 when train.bf16): see rollout_model.py for why.
    sampler_model = RolloutModel(model, torch.bfloat16 if t.bf16 else torch.float32)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = lr_schedule(optimizer, t)
    sampler = PromptSampler(read_jsonl(paths.train_split), t.seed, t.selective_rollouts_explore if t.selective_rollouts else 1.0)
    weights = torch.tensor([s.weight for s in t.rewards])
    eps_high = t.epsilon if t.epsilon_high is None else t.epsilon_high
    key = fingerprint(cfg, manifest["sha256"], paths.train_split.read_bytes())

    # Resume from the newest checkpoint of this exact config, or start afresh.
    state: dict[str, Any] = {"history": [], "run_id": None}
    start = 0
    saved = checkpoint.latest(paths.checkpoints_dir) if t.resume else None
    resumable = saved is not None and json.loads((saved / "state.json").read_text()).get("fingerprint") == key
    world.barrier()  # every process has looked before rank 0 may clear the checkpoints
    if saved is not None and resumable:
        state = checkpoint.load(saved, model, optimizer, scheduler)
        sampler.load_state_dict(state["sampler"])
        sampler_model.sync()
        start = int(state["step"])
        if world.is_main:
            print(f"resuming from {saved} (step {start} of {t.steps})", file=sys.stderr)
    elif paths.checkpoints_dir.exists() and world.is_main:
        shutil.rmtree(paths.checkpoints_dir)  # checkpoints of another config or data: not resumable
    history: list[dict[str, float]] = state["history"]

    # Only rank 0 writes: MLflow, checkpoints, metrics, the adapter.
    logger = RunLogger(paths, cfg, enabled=log_to_mlflow and world.is_main, run_id=state.get("run_id"))
    bar = tqdm(range(start, t.steps), desc="GRPO", unit="step", initial=start, total=t.steps, disable=not world.is_main)
    try:
        for step in bar:
            if t.time_budget_s is not None and history and history[-1]["wall_time"] >= t.time_budget_s:
                if world.is_main:
                    bar.write(f"stopping after step {step}: train.time_budget_s={t.time_budget_s:g} s used")
                break
            started = time.perf_counter()

            # 1. Sample a group of completions per prompt from the current policy, and score them
            #    (with several processes, each samples its own slice of the prompts).
            # From the history, so that a resumed run draws exactly what an uninterrupted one would.
            signal_rate = 1.0 - history[-1]["frac_reward_zero_std"] if history else 1.0
            skipped_before = sampler.skipped
            batch = sample_batch(
                sampler_model.model, tokenizer, sampler, cfg, autocast=False, step=step, world=world, signal_rate=signal_rate
            )
            rollout = batch.rollout
            generated = time.perf_counter()

            # 2. Advantages relative to the group, from the whole batch's rewards; keep this process's.
            advantages, rewards, group_std = advantages_from_rewards(
                batch.per_function, weights, G, t.scale_rewards, t.multi_objective_aggregation
            )
            advantages = advantages[batch.local]
            mask = rollout.completion_mask.float()
            if t.mask_truncated_completions:
                mask = mask * (~rollout.truncated).float().unsqueeze(-1)
            # This process's part of the loss's normaliser (1 for one process): summed over the
            # processes, the weighted losses and their gradients are the whole batch's.
            share = distributed.loss_share(t.loss_type, mask, world)

            # Old log-probs are only needed when the policy moves between passes over this
            # batch (mu > 1); on-policy, logp.detach() is the same number at no extra cost.
            old_logp = None
            if t.num_iterations > 1:
                with torch.no_grad():
                    old_logp, _ = token_logps(model, rollout, t.bf16, temperature=t.temperature)
            ref_logp = None
            if t.beta != 0.0:
                scorer, disabled = policy.reference_view(model, reference)
                with torch.no_grad(), disabled:
                    ref_logp, _ = token_logps(scorer, rollout, t.bf16, temperature=t.temperature)
            is_weight, sampler_stats = None, {}

            # 3. mu clipped policy-gradient updates on this batch.
            model.train()
            for iteration in range(t.num_iterations):
                logp, entropy = token_logps(model, rollout, t.bf16, with_entropy=True, temperature=t.temperature)
                if iteration == 0 and rollout.sampler_logps is not None:
                    # The sampler's log-probs against the policy's before this batch's updates.
                    is_weight, sampler_stats = importance_weights(
                        logp if old_logp is None else old_logp, rollout.sampler_logps, mask, t.sampling_correction,
                        t.sampling_correction_min, t.sampling_correction_max,
                    )
                loss, stats = grpo_loss(
                    logp, logp.detach() if old_logp is None else old_logp, advantages, mask,
                    ref_logp=ref_logp, beta=t.beta, epsilon_low=t.epsilon, epsilon_high=eps_high,
                    loss_type=t.loss_type, importance_sampling_level=t.importance_sampling_level,
                    max_completion_length=t.max_completion_length, is_weight=is_weight,
                )
                (loss * share).backward()
                world.all_reduce_grads(params)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            sampler_model.sync()  # the next rollout samples from the updated policy

            # 4. Log what the field looks at.
            # Rewards are the whole batch's already; per-token and per-completion figures are
            # averaged over processes, and the slowest one's time counts (so budgets agree).
            elapsed = world.max(time.perf_counter() - started)
            lengths = rollout.lengths.float()
            fn_means = batch.per_function.nanmean(dim=0).tolist()
            per_token = world.average(
                {
                    "kl": stats.kl, "low": stats.clip_low, "high": stats.clip_high, "region": stats.clip_region,
                    "entropy": float((entropy * mask).sum() / mask.sum().clamp(min=1)),
                },
                weight=float(mask.sum()),
            )
            per_completion = world.average(
                {"length": float(lengths.mean()), "clipped": float(rollout.truncated.float().mean())},
                weight=float(lengths.numel()),
            )
            metrics = {
                "loss": world.sum(float(loss.detach()) * share),
                "reward": float(rewards.mean()),
                "reward_std": float(group_std.mean()),
                **{f"rewards/{s.name}/mean": m for s, m in zip(t.rewards, fn_means, strict=True)},
                "frac_reward_zero_std": batch.frac_zero_std,
                "resample_rounds": float(batch.rounds),
                "prompts_sampled": float(batch.prompts_sampled),
                "prompts_skipped": float(sampler.skipped - skipped_before),  # selective rollouts
                "kl": per_token["kl"],
                "clip_ratio/low_mean": per_token["low"],
                "clip_ratio/high_mean": per_token["high"],
                "clip_ratio/region_mean": per_token["region"],
                "entropy": per_token["entropy"],
                **_sampler_metrics(sampler_stats, world, weight=float(mask.sum())),
                "completions/mean_length": per_completion["length"],
                "completions/clipped_ratio": per_completion["clipped"],
                "grad_norm": grad_norm,  # before clipping, of the last of the mu updates
                "learning_rate": scheduler.get_last_lr()[0],
                "step_time": elapsed,
                "generation_time": generated - started,
                "tokens_per_second": world.sum(float(lengths.sum())) / elapsed,
            }
            # Cumulative training time, carried across resumes: curves are drawn against it.
            metrics["wall_time"] = (history[-1]["wall_time"] if history else 0.0) + elapsed
            history.append({"step": step + 1, **metrics})
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", step_s=f"{elapsed:.1f}")
            if batch.frac_zero_std >= 0.75 and step > start and world.is_main:
                bar.write(
                    f"step {step + 1}: {batch.frac_zero_std:.0%} of groups had equal rewards, so the loss is near zero; "
                    "raise train.num_generations or train.temperature, use harder prompts, or set train.dynamic_sampling"
                )
            if world.is_main and (warning := truncation_warning(history, t)):
                bar.write(warning)
            logger.step(step + 1, metrics, batch.rows, rollout.texts, rewards[batch.local])

            # 5. Checkpoint for exact resume.
            if world.is_main and t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < t.steps:
                checkpoint.save(
                    paths.checkpoints_dir, step + 1, model, optimizer, scheduler,
                    {"fingerprint": key, "sampler": sampler.state_dict(), "history": history, "run_id": logger.run_id},
                    keep=t.keep_checkpoints,
                )
    except BaseException as exc:
        logger.fail(isinstance(exc, KeyboardInterrupt))
        raise
    finally:
        bar.close()

    done = int(history[-1]["step"]) if history else start
    final = {k: v for k, v in history[-1].items() if k != "step"} if history else {}
    if world.is_main:
        checkpoint.save(
            paths.checkpoints_dir, done, model, optimizer, scheduler,
            {"fingerprint": key, "sampler": sampler.state_dict(), "history": history, "run_id": logger.run_id},
            keep=t.keep_checkpoints,
        )
        with staged_dir(paths.policy_dir) as staging:
            policy.save(model, tokenizer, staging)
        write_json(paths.train_metrics, {**final, "steps": done, "mlflow_run_id": logger.run_id})
        write_text(paths.train_plot, _csv(history))
        logger.finish(training_curves(history, paths.train_curves))
    return TrainResult(steps=done, final_reward=final.get("reward", math.nan), run_id=logger.run_id, resumed_from=start)


def truncation_warning(history: list[dict[str, float]], t: Any) -> str | None:
    """A warning when most completions start running to the length limit, else None.

    Seen on the demo's task mix at lr 2e-4 without KL past ~35 steps: the policy stops emitting EOS
    after its answer, rambles to the limit while the `#### N` inside still earns the accuracy
    reward, entropy climbs from ~0.02 to ~1 and held-out strict accuracy falls to near zero.
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


def _sampler_metrics(stats: dict[str, float], world: distributed.World, weight: float) -> dict[str, float]:
    """The sampler-mismatch figures over all processes: means weighted by tokens, extremes as extremes."""
    out = world.average({k: v for k, v in stats.items() if k.endswith("/mean")}, weight=weight) if stats else {}
    for key, value in stats.items():
        if key.endswith("/max"):
            out[key] = world.max(value)
        elif key.endswith("/min"):
            out[key] = -world.max(-value)
    return out


def _csv(history: list[dict[str, float]]) -> str:
    if not history:
        return ""
    buf = io.StringIO()
    fields = ["step", *(k for k in history[-1] if k != "step")]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()
