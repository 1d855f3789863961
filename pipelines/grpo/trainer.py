"""Stage 3, train: GRPO on the pinned reference (LoRA adapter or full fine-tuning).

One flat loop: sample a group of completions per prompt and score them (batch.py) ->
group-relative advantages -> `num_iterations` clipped policy-gradient updates -> log -> checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from pipelines.config import Config, ConfigError
from pipelines.device import peak_memory_metrics, reset_peak_memory
from pipelines.device import resolve as resolve_device
from pipelines.env import set_threads
from pipelines.generation.policy_sampler import policy_sampler, sampling_dtype
from pipelines.generation.rollout import Rollout
from pipelines.grpo import checkpoint, distributed, launcher, ledger, policy, sharding
from pipelines.grpo.advantages import advantages_from_rewards
from pipelines.grpo.batch import Batch, sample_batch
from pipelines.grpo.logprobs import token_logps
from pipelines.grpo.loss import LossStats, grpo_loss, loss_settings
from pipelines.grpo.metrics import (
    flat_groups_warning,
    history_csv,
    on_policy_knobs_warning,
    scores_csv,
    step_metrics,
    truncation_warning,
)
from pipelines.grpo.plots import training_curves
from pipelines.grpo.prompt_sampler import PromptSampler
from pipelines.grpo.run_logger import RunLogger
from pipelines.grpo.sampling_correction import importance_weights
from pipelines.grpo.summary import write as write_summary
from pipelines.grpo.validation import Watch, mean_reward_since, score_split
from pipelines.io import read_jsonl, staged_dir, write_text
from pipelines.paths import Paths
from pipelines.snapshot.manifest import verify
from pipelines.verifiers import catalog
from pipelines.verifiers.task import Task
from pipelines.verifiers.versions import verifier_versions

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    final_reward: float
    run_id: str | None
    resumed_from: int = 0


@dataclass
class Progress:
    """What a checkpoint restores besides tensors: where the loop stands and what it has logged."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    validation: dict[str, Any] | None = None  # Watch.state_dict(): evaluations, best, alarms


@dataclass
class Job:
    """What the loop works on, built once by `setup`: the policy, its optimiser, the prompts, the logs."""

    cfg: Config  # with the task's rewards filled in (task_setup)
    paths: Paths
    world: distributed.World
    task: Task
    task_warning: str | None  # the rewards leave out the task's correctness reward
    device: torch.device
    sharded: bool  # train.fsdp on several processes: each holds a shard (sharding.py)
    model: Any
    tokenizer: Any
    reference: Any  # the frozen reference the KL term compares with (policy.reference_view)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: PromptSampler
    reward_weights: torch.Tensor
    loss: dict[str, Any]  # grpo_loss's knobs from the config (loss_settings)
    val_rows: list[dict[str, Any]]
    key: str  # what a checkpoint must match to be resumed (fingerprint)
    start: int  # the step it starts from: 0, or the resumed checkpoint's
    history: list[dict[str, float]]  # each step's metrics, a resumed run's included
    watch: Watch
    copy: Any  # what rollouts sample from (policy_sampler)
    logger: RunLogger


@dataclass
class Update:
    """What a step's last policy update leaves for the step's metrics."""

    loss: torch.Tensor
    stats: LossStats
    entropy: torch.Tensor
    grad_norm: float
    sampler_stats: dict[str, float]


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
    return get_scheduler(
        name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps * t.num_iterations
    )


def _bytes(path: Any) -> bytes:
    return path.read_bytes() if path.exists() else b""


def fingerprint(cfg: Config, reference_sha: str, train_bytes: bytes) -> str:
    """What must be equal for a checkpoint to be resumed: training config, reference and data."""
    # Not the number of processes, nor FSDP: a data-parallel run, sharded or not, makes the same updates as
    # one process. Nor how it computes: bf16 and gradient checkpointing change rounding and memory, not the
    # run, so a checkpoint made on a GPU (bf16) resumes on the CPU (fp32 there without bf16 units) and back.
    exclude = {"num_processes", "fsdp", "ledger_every", "bf16", "gradient_checkpointing"}
    train = cfg.train.model_dump(exclude=exclude)
    payload = json.dumps({"train": train, "ref": reference_sha, "task": cfg.task}, sort_keys=True).encode()
    return hashlib.sha256(payload + hashlib.sha256(train_bytes).digest()).hexdigest()


class NonFiniteError(ConfigError):
    """Training produced NaN or inf; the message names the step and the knobs to turn."""


def check_finite(step: int, loss: torch.Tensor | None, grad_norm: float | None, params: Any = ()) -> None:
    """Stop at the first non-finite loss, gradient or weight: a NaN policy must never be saved,
    evaluated or registered. The checkpoints of earlier steps stay as they were."""
    if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
        what = f"the loss is {float(loss.detach())}"
    elif grad_norm is not None and not math.isfinite(grad_norm):
        what = f"the gradient norm is {grad_norm}"
    elif not sharding.all_finite(params):  # each rank its shards under FSDP, and all agree
        what = "the trainable weights hold NaN or inf"
    else:
        return
    raise NonFiniteError(
        f"training stopped at step {step}: {what}. Nothing of this step was saved; lower train.learning_rate, "
        "raise train.temperature (a tiny one overflows the logits) or lower train.max_grad_norm, then run "
        "`grpo train` again (it resumes from the last checkpoint)"
    )


def task_setup(cfg: Config, paths: Paths) -> tuple[Config, Task, str | None]:
    """The task, the config with its rewards filled in (train.rewards null = the task's own), and a
    warning when they leave out the task's correctness reward. Before anything trains, the judge and
    the correctness reward must agree on the task's golden cases (catalog.check_golden)."""
    task = catalog.load(cfg.task, paths.root)  # a TaskError is a ConfigError: one line on the command line
    cfg = catalog.with_rewards(cfg, task)
    catalog.check_golden(task, timeout=cfg.train.reward_timeout, knob="train.reward_timeout")
    return cfg, task, catalog.correctness_warning(task, [s.name for s in cfg.train.rewards])


def run(cfg: Config, paths: Paths, log_to_mlflow: bool = True) -> TrainResult:
    """Train; with `train.num_processes > 1`, in that many processes under torchrun (launcher.py)."""
    if cfg.train.num_processes > 1 and not distributed.under_torchrun():
        return TrainResult(**launcher.launch(cfg, paths, log_to_mlflow))
    with distributed.world(cfg.train) as world:
        return train(cfg, paths, world, log_to_mlflow)


def resume_or_start(
    cfg: Config,
    paths: Paths,
    key: str,
    world: distributed.World,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    sampler: PromptSampler,
) -> Progress:
    """Restore the newest checkpoint of this exact config and data, or clear stale ones and start at 0."""
    saved = checkpoint.latest(paths.checkpoints_dir) if cfg.train.resume else None
    resumable = saved is not None and json.loads((saved / "state.json").read_text()).get("fingerprint") == key
    world.barrier()  # every process has looked before rank 0 may clear the checkpoints
    if saved is not None and resumable:
        load = sharding.load_checkpoint if sharding.is_sharded(model) else checkpoint.load
        state = load(saved, model, optimizer, scheduler)
        sampler.load_state_dict(state["sampler"])
        if world.is_main:
            log.info("resuming from %s (step %s of %d)", saved, state["step"], cfg.train.steps)
        return Progress(int(state["step"]), state["history"], state.get("run_id"), state.get("validation"))
    if paths.checkpoints_dir.exists() and world.is_main:
        shutil.rmtree(paths.checkpoints_dir)  # checkpoints of another config or data: not resumable
    return Progress()


def save_checkpoint(job: Job, step: int) -> None:
    """Everything exact resume needs, in checkpoints/step-N, written by rank 0. Every rank calls it: under
    FSDP each joins the gather of the whole weights and optimiser state first (sharding.py)."""
    if not (job.world.is_main or sharding.is_sharded(job.model)):
        return
    weights = sharding.full_trainable_state(job.model)
    moments = sharding.full_optimizer_state(job.model, job.optimizer)
    if not job.world.is_main:
        return
    state = {
        "fingerprint": job.key,
        "sampler": job.sampler.state_dict(),
        "history": job.history,
        "run_id": job.logger.run_id,
        "validation": job.watch.state_dict(),
    }
    keep = job.cfg.train.keep_checkpoints
    checkpoint.write(job.paths.checkpoints_dir, step, weights, moments, job.scheduler, state, keep=keep)


def train(
    cfg: Config, paths: Paths, world: distributed.World = distributed.SINGLE, log_to_mlflow: bool = True
) -> TrainResult:
    """The training loop of one process (rank `world.rank` of `world.size`): setup, the steps, the end."""
    # What rollouts sample from (a merged copy, or a vLLM server) closes when the steps end, however they end.
    samplers = ExitStack()
    job = setup(cfg, paths, world, log_to_mlflow, samplers)
    t, G, history, watch = job.cfg.train, job.cfg.train.num_generations, job.history, job.watch
    try:
        announce(job)
        if job.val_rows and not watch.scores:
            validate(job, 0)  # the reference's score: the baseline every later evaluation is judged against
        for step in range(job.start, t.steps):
            if out_of_time(job, step) or watch.stop_reason:  # (stop_reason: a resumed run that had stopped early)
                break
            started = time.perf_counter()
            reset_peak_memory(job.device)

            # 1. Sample a group of completions per prompt from the current policy, and score them
            #    (with several processes, each samples its own slice of the prompts).
            skipped_before = job.sampler.skipped
            batch = sample(job, step)
            on_device = batch.rollout.to(job.device)  # what the training pass reads; batch.rollout stays on the CPU
            generated = time.perf_counter()

            # 2. Advantages relative to the group, from the whole batch's rewards; keep this process's.
            advantages, rewards, group_std = advantages_from_rewards(
                batch.per_function, job.reward_weights, G, t.scale_rewards, t.multi_objective_aggregation
            )
            advantages = advantages[batch.local]
            mask = loss_mask(on_device, t)
            # This process's part of the loss's normaliser (1 for one process): summed over the
            # processes, the weighted losses and their gradients are the whole batch's.
            share = distributed.loss_share(t.loss_type, mask, world)

            # 3. mu clipped policy-gradient updates on this batch.
            update = update_policy(job, step, on_device, advantages, mask, share)
            job.copy.sync()  # the next rollout samples from the updated policy

            # 4. Log what the field looks at, and keep the step's rollouts in the ledger.
            elapsed = world.max(time.perf_counter() - started)
            skipped = job.sampler.skipped - skipped_before
            metrics = measure(
                job, batch, rewards, group_std, mask, share, update, skipped, elapsed, generated - started
            )
            history.append({"step": step + 1, **metrics})
            report(job, step, batch, metrics)
            job.logger.step(step + 1, metrics, batch.rows, batch.rollout.transcripts, rewards[batch.local], advantages)
            record_ledger(job, step, batch, rewards, advantages)

            # 5. Validation: the held-out skill, not the reward (validation.py says why).
            stop = False
            if job.val_rows and t.eval_every and (step + 1) % t.eval_every == 0:
                validate(job, step + 1)
                stop = should_stop(job)  # decided before the checkpoint keeps it

            # 6. Checkpoint for exact resume.
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < t.steps:
                save_checkpoint(job, step + 1)
            if stop:
                break
        done = int(history[-1]["step"]) if history else job.start
        if job.val_rows and (not watch.scores or watch.scores[-1].step != done):
            validate(job, done)  # a run that stopped between evaluations: selection and the reports need its last step
    except BaseException as exc:
        job.logger.fail(isinstance(exc, KeyboardInterrupt))
        raise
    finally:
        samplers.close()
    return finish(job, done)


def setup(cfg: Config, paths: Paths, world: distributed.World, log_to_mlflow: bool, samplers: ExitStack) -> Job:
    """What the loop works on, resumed from the newest checkpoint of this exact config and data if any.

    The seed is set before the policy is built (LoRA's initial weights); the policy sampler enters
    `samplers`, which the caller closes."""
    cfg, task, disagreement = task_setup(cfg, paths)
    t = cfg.train
    set_threads(cfg.runtime.num_threads)
    torch.manual_seed(t.seed)
    device = resolve_device(cfg.runtime.device)  # under torchrun, this rank's GPU
    manifest = verify(paths.reference_dir)  # the reference must be exactly the pinned one
    sharded = sharding.enabled(t, world)  # train.fsdp on several processes: each holds a shard (sharding.py)
    model, tokenizer, reference = policy.build(cfg, paths, torch.device("cpu") if sharded else device)
    made = sharding.shard(model, reference, device, sampling_dtype(cfg)) if sharded else None  # + sampling copy
    params = policy.trainable_parameters(model)
    if not sharded:  # (every rank loaded the same reference, and FSDP's shards are cut from it)
        world.broadcast(params)  # every process starts from rank 0's weights
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = lr_schedule(optimizer, t)
    sampler = PromptSampler(
        read_jsonl(paths.train_split), t.seed, t.selective_rollouts_explore if t.selective_rollouts else 1.0
    )
    val_rows = read_jsonl(paths.val_split) if paths.val_split.exists() else []
    key = fingerprint(cfg, manifest["sha256"], paths.train_split.read_bytes() + _bytes(paths.val_split))
    progress = resume_or_start(cfg, paths, key, world, model, optimizer, scheduler, sampler)
    watch = Watch.from_state(progress.validation, t.decline_window, t.select_tolerance, t.decline_tolerance)
    # What rollouts sample from: a merged copy of the policy (bf16 when train.bf16; sampling_copy.py
    # says why), or the adapter on a vLLM server (vllm_backend.py).
    copy = samplers.enter_context(policy_sampler(cfg, model, paths, made))
    # Only rank 0 writes: MLflow, checkpoints, metrics, the adapter.
    logger = RunLogger(paths, cfg, enabled=log_to_mlflow and world.is_main, run_id=progress.run_id)
    return Job(
        cfg, paths, world, task, disagreement, device, sharded, model, tokenizer, reference, params, optimizer,
        scheduler, sampler, torch.tensor([s.weight for s in t.rewards]), loss_settings(t), val_rows, key,
        progress.step, progress.history, watch, copy, logger,
    )  # fmt: skip


def announce(job: Job) -> None:
    """Rank 0's opening lines: the plan, and the warnings about the task's rewards and inert knobs."""
    if not job.world.is_main:
        return
    t = job.cfg.train
    log.info("training %d steps from step %d: %s", t.steps, job.start, _plan(job.cfg))
    if job.task_warning:
        log.warning(job.task_warning)
        job.logger.tags({"task_warning": job.task_warning[:5000]})
    if inert := on_policy_knobs_warning(t):
        log.warning(inert)


def out_of_time(job: Job, step: int) -> bool:
    """Whether `train.time_budget_s` is spent, by the steps so far (a resumed run's included)."""
    t, history = job.cfg.train, job.history
    if t.time_budget_s is None or not history or history[-1]["wall_time"] < t.time_budget_s:
        return False
    if job.world.is_main:
        log.warning("stopping after step %d: train.time_budget_s=%g s used", step, t.time_budget_s)
    return True


def sample(job: Job, step: int) -> Batch:
    """This step's batch: a group of scored completions per prompt (batch.py), this process's slice."""
    # From the history, so that a resumed run draws exactly what an uninterrupted one would.
    signal_rate = 1.0 - job.history[-1]["frac_reward_zero_std"] if job.history else 1.0
    return sample_batch(
        job.copy.model,
        job.tokenizer,
        job.sampler,
        job.cfg,
        autocast=False,
        step=step,
        world=job.world,
        signal_rate=signal_rate,
        task=job.task,
    )


def loss_mask(on_device: Rollout, t: Any) -> torch.Tensor:
    """The tokens the loss acts on: the model's own (not a tool's replies), less every token of a
    truncated completion with `train.mask_truncated_completions`."""
    mask = on_device.trained_mask.float()
    if t.mask_truncated_completions:
        mask = mask * (~on_device.truncated).float().unsqueeze(-1)
    return mask


def fixed_logps(job: Job, on_device: Rollout) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The log-probs that stay fixed through the batch's updates: the policy's before them (old) and the
    reference's (for the KL term); None where not needed."""
    t = job.cfg.train
    # Old log-probs are only needed when the policy moves between passes over this
    # batch (mu > 1); on-policy, logp.detach() is the same number at no extra cost.
    old_logp = None
    if t.num_iterations > 1:
        with torch.no_grad():
            old_logp, _ = token_logps(job.model, on_device, t.bf16, temperature=t.temperature)
    ref_logp = None
    if t.beta != 0.0:
        scorer, disabled = policy.reference_view(job.model, job.reference)
        with torch.no_grad(), disabled:
            ref_logp, _ = token_logps(scorer, on_device, t.bf16, temperature=t.temperature)
    return old_logp, ref_logp


def update_policy(
    job: Job, step: int, on_device: Rollout, advantages: torch.Tensor, mask: torch.Tensor, share: float
) -> Update:
    """`train.num_iterations` (mu) clipped policy-gradient updates on this batch; what the last one leaves."""
    t, world, params = job.cfg.train, job.world, job.params
    old_logp, ref_logp = fixed_logps(job, on_device)
    is_weight, sampler_stats = None, {}
    job.model.train()
    for iteration in range(t.num_iterations):
        logp, entropy = token_logps(job.model, on_device, t.bf16, with_entropy=True, temperature=t.temperature)
        if iteration == 0 and on_device.sampler_logps is not None:
            # The sampler's log-probs against the policy's before this batch's updates.
            is_weight, sampler_stats = importance_weights(
                logp if old_logp is None else old_logp,
                on_device.sampler_logps,
                mask,
                t.sampling_correction,
                t.sampling_correction_min,
                t.sampling_correction_max,
            )
        # The quantile is over the whole batch's tokens, on every process (as TRL gathers them).
        pool = world.gather(entropy.detach()[mask.bool()]) if t.top_entropy_quantile < 1.0 else None
        old = logp.detach() if old_logp is None else old_logp
        loss, stats = grpo_loss(
            logp, old, advantages.to(job.device), mask,
            ref_logp=ref_logp, is_weight=is_weight, entropy=entropy, entropy_pool=pool, **job.loss,
        )  # fmt: skip
        # A process that kept no group adds nothing, but joins the sum below (under FSDP, in backward).
        if on_device.rows or job.sharded:
            (loss * share).backward()
        if not job.sharded:  # FSDP has summed them already, each rank its shard
            world.all_reduce_grads(params)
        grad_norm = sharding.clip_grad_norm(params, t.max_grad_norm)
        check_finite(step + 1, loss, grad_norm)  # before the step: the weights stay as they were
        job.optimizer.step()
        job.scheduler.step()
        job.optimizer.zero_grad(set_to_none=True)
    check_finite(step + 1, None, None, params)
    return Update(loss, stats, entropy, grad_norm, sampler_stats)


def measure(
    job: Job,
    batch: Batch,
    rewards: torch.Tensor,
    group_std: torch.Tensor,
    mask: torch.Tensor,
    share: float,
    update: Update,
    skipped: int,
    elapsed: float,
    generation_time: float,
) -> dict[str, float]:
    """The step's metrics (metrics.py), the GPU's peak memory, and the training time so far."""
    t = job.cfg.train
    metrics = step_metrics(
        batch=batch,
        rewards=rewards,
        group_std=group_std,
        reward_names=[s.name for s in t.rewards],
        loss=float(update.loss.detach()),
        share=share,
        stats=update.stats,
        entropy=update.entropy,
        mask=mask,
        sampler_stats=update.sampler_stats,
        skipped=skipped,
        grad_norm=update.grad_norm,
        learning_rate=job.scheduler.get_last_lr()[0],
        elapsed=elapsed,
        generation_time=generation_time,
        world=job.world,
        tools=bool(job.task.tools),
    )
    metrics.update(peak_memory_metrics(job.device))  # the GPU's, per step (nothing on the CPU)
    # Cumulative training time, carried across resumes: curves are drawn against it.
    metrics["wall_time"] = (job.history[-1]["wall_time"] if job.history else 0.0) + elapsed
    return metrics


def report(job: Job, step: int, batch: Batch, metrics: dict[str, float]) -> None:
    """Rank 0's log lines for the step: its progress line, and the warnings the step calls for."""
    if not job.world.is_main:
        return
    t = job.cfg.train
    # Progress as log lines, not a bar: one per step up to 100 steps, else about 100 in all.
    every = max(1, t.steps // 100)
    if (step + 1) % every == 0 or step == job.start or step + 1 == t.steps:
        log.info(progress_line(step + 1, t.steps, metrics))
    for warning in (
        flat_groups_warning(step + 1, batch, t) if step > job.start else None,
        truncation_warning(job.history, t),
    ):
        if warning:
            log.warning(warning)


def record_ledger(job: Job, step: int, batch: Batch, rewards: torch.Tensor, advantages: torch.Tensor) -> None:
    """The rollout ledger (ledger.py): this step's completions, scores and advantages, every process's
    slice, written by rank 0."""
    t, world = job.cfg.train, job.world
    slices = []
    if ledger.keeps(step + 1, t.ledger_every):
        slices = world.gather_objects(
            ledger.table(step + 1, batch.rows, batch.rollout, batch.per_function[batch.local],
                         [s.name for s in t.rewards], rewards[batch.local], advantages,
                         positions=batch.local.nonzero().squeeze(-1))
        )  # fmt: skip
    if world.is_main:
        ledger.record(ledger.ledger_dir(job.paths.root), step + 1, t.ledger_every, partial(ledger.merge, slices))


def validate(job: Job, step: int) -> None:
    """Score the validation split now (every process, so all agree on stopping); rank 0 logs and
    keeps the best weights."""
    cfg, watch = job.cfg, job.watch
    previous = watch.scores[-1].step if watch.scores else 0
    score = score_split(
        job.copy.model, job.tokenizer, job.val_rows, step=step, max_new_tokens=cfg.evaluate.max_new_tokens,
        batch_size=cfg.evaluate.batch_size, backend=cfg.runtime.rollout_backend,
        judge_timeout=cfg.evaluate.judge_timeout, task=job.task,
    )  # fmt: skip
    score.reward = mean_reward_since(job.history, previous) if step > 0 else None
    alarms = watch.add(score)
    if watch.selected is score and (job.world.is_main or job.sharded):  # every rank gathers under FSDP
        weights = sharding.full_trainable_state(job.model)
        if job.world.is_main:
            checkpoint.save_best(job.paths.checkpoints_dir, step, weights, score.accuracy)
    if not job.world.is_main:
        return
    job.logger.validation(step, score, alarms)
    log.info(
        "validation at step %d: accuracy %.3f (lenient %.3f, format %.3f) on %d problems",
        step, score.accuracy, score.lenient_accuracy, score.format_rate, len(job.val_rows),
    )  # fmt: skip
    for message in alarms:
        log.warning(message)


def should_stop(job: Job) -> bool:
    """Whether the validations so far stop training early (`train.early_stopping_patience`)."""
    stop = job.watch.should_stop(job.cfg.train.early_stopping_patience)
    if stop and job.world.is_main:
        log.warning(job.watch.stop_reason or "")
        job.logger.tags({"stop_reason": job.watch.stop_reason or ""})
    return stop


def finish(job: Job, done: int) -> TrainResult:
    """The end of training: the last checkpoint, then (rank 0) the policy that leaves `train`, the
    reports, and the run's last logs."""
    history = job.history
    save_checkpoint(job, done)
    model = job.model
    if job.sharded:  # rank 0 goes on with the policy whole, as one plain model on the CPU (None on the others)
        model = sharding.gathered_policy(model, job.cfg, job.paths, job.world)
    if job.world.is_main:
        selected = select_policy(job, model, done)
        with staged_dir(job.paths.policy_dir) as staging:
            policy.save(model, job.tokenizer, staging)
        summary = write_reports(job, done, selected)
        curves = training_curves(history, job.paths.train_curves, job.watch.scores)
        job.logger.finished(summary, job.watch.scores, model, job.tokenizer, curves)
    final_reward = history[-1].get("reward", math.nan) if history else math.nan
    return TrainResult(steps=done, final_reward=final_reward, run_id=job.logger.run_id, resumed_from=job.start)


def select_policy(job: Job, model: Any, done: int) -> int:
    """The step whose weights leave `train`: the selected validated step's (validation.py), loaded into
    `model`, or the last step's."""
    watch = job.watch
    if job.cfg.train.select != "best" or watch.selected is None or watch.selected.step == done:
        return done
    selected = checkpoint.load_best(job.paths.checkpoints_dir, model)
    log.warning(
        "selected step %d (validation accuracy %.3f) over the last step %d (%.3f); train.select=last "
        "keeps the last",
        selected, watch.selected.accuracy, done, watch.scores[-1].accuracy,
    )  # fmt: skip
    return selected


def write_reports(job: Job, done: int, selected: int) -> dict[str, Any]:
    """reports/train.json (and its headline figures in metrics/train.json), the training and validation
    curves as CSV; returns the summary."""
    t, history, watch, task = job.cfg.train, job.history, job.watch, job.task
    final = {k: v for k, v in history[-1].items() if k != "step"} if history else {}
    spent = sum(h["step_time"] for h in history)
    summary = {
        **final,
        "steps": done,
        "select": t.select,
        "selected_step": selected,
        "validation": watch.summary(spent) if watch.scores else None,
        "mlflow_run_id": job.logger.run_id,
        "task": task.name,
        "verifiers": verifier_versions(task, [s.name for s in t.rewards]),  # pipelines/verifiers/versions.py
    }
    write_summary(job.paths, summary)
    write_text(job.paths.train_plot, history_csv(history, task.correctness))
    write_text(job.paths.val_plot, scores_csv(watch.scores, history))
    return summary


def _plan(cfg: Config) -> str:
    t = cfg.train
    return (
        f"{t.prompts_per_step} prompts x {t.num_generations} completions a step, up to {t.max_completion_length} "
        f"tokens, lr {t.learning_rate:g}, beta {t.beta:g}, loss {t.loss_type}"
    )


def progress_line(step: int, steps: int, metrics: dict[str, float]) -> str:
    """One training step in a line: what a progress bar's postfix held, and what the field watches.

    >>> print(progress_line(3, 30, {"reward": 0.5, "reward_std": 0.25, "kl": 0.001, "entropy": 0.4,
    ...     "frac_reward_zero_std": 0.5, "completions/mean_length": 31.0, "completions/clipped_ratio": 0.0,
    ...     "step_time": 4.25}))
    step 3/30: reward 0.500 (std 0.250), kl 0.0010, entropy 0.40, flat groups 50%, 31 tokens (0% clipped), 4.2 s
    """
    m = metrics
    return (
        f"step {step}/{steps}: reward {m['reward']:.3f} (std {m['reward_std']:.3f}), kl {m['kl']:.4f}, "
        f"entropy {m['entropy']:.2f}, flat groups {m['frac_reward_zero_std']:.0%}, "
        f"{m['completions/mean_length']:.0f} tokens ({m['completions/clipped_ratio']:.0%} clipped), "
        f"{m['step_time']:.1f} s"
    )
