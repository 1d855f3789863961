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
from pipelines.grpo import checkpoint, distributed, launcher, ledger, policy, sharding
from pipelines.grpo.advantages import advantages_from_rewards
from pipelines.grpo.batch import sample_batch
from pipelines.grpo.logprobs import token_logps
from pipelines.grpo.loss import grpo_loss
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


def save_checkpoint(
    paths: Paths,
    cfg: Config,
    step: int,
    key: str,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    sampler: PromptSampler,
    history: list[dict[str, float]],
    run_id: str | None,
    watch: Watch,
    world: distributed.World,
) -> None:
    """Everything exact resume needs, in checkpoints/step-N, written by rank 0. Every rank calls it: under
    FSDP each joins the gather of the whole weights and optimiser state first (sharding.py)."""
    if not (world.is_main or sharding.is_sharded(model)):
        return
    weights, moments = sharding.full_trainable_state(model), sharding.full_optimizer_state(model, optimizer)
    if not world.is_main:
        return
    state = {
        "fingerprint": key,
        "sampler": sampler.state_dict(),
        "history": history,
        "run_id": run_id,
        "validation": watch.state_dict(),
    }
    checkpoint.write(paths.checkpoints_dir, step, weights, moments, scheduler, state, keep=cfg.train.keep_checkpoints)


def train(
    cfg: Config, paths: Paths, world: distributed.World = distributed.SINGLE, log_to_mlflow: bool = True
) -> TrainResult:
    """The training loop of one process (rank `world.rank` of `world.size`)."""
    cfg, task, disagreement = task_setup(cfg, paths)
    t, G = cfg.train, cfg.train.num_generations
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
    weights = torch.tensor([s.weight for s in t.rewards])
    eps_high = t.epsilon if t.epsilon_high is None else t.epsilon_high
    val_rows = read_jsonl(paths.val_split) if paths.val_split.exists() else []
    key = fingerprint(cfg, manifest["sha256"], paths.train_split.read_bytes() + _bytes(paths.val_split))
    progress = resume_or_start(cfg, paths, key, world, model, optimizer, scheduler, sampler)
    start, history = progress.step, progress.history
    watch = Watch.from_state(progress.validation, t.decline_window, t.select_tolerance, t.decline_tolerance)
    # What rollouts sample from: a merged copy of the policy (bf16 when train.bf16; sampling_copy.py
    # says why), or the adapter on a vLLM server (vllm_backend.py). Closed (server stopped) at the end.
    samplers = ExitStack()
    copy = samplers.enter_context(policy_sampler(cfg, model, paths, made))

    # Only rank 0 writes: MLflow, checkpoints, metrics, the adapter.
    logger = RunLogger(paths, cfg, enabled=log_to_mlflow and world.is_main, run_id=progress.run_id)
    # Progress as log lines, not a bar: one per step up to 100 steps, else about 100 in all.
    every = max(1, t.steps // 100)

    def validate(step: int) -> None:
        """Score the validation split now (every process, so all agree on stopping); rank 0 logs and
        keeps the best weights."""
        previous = watch.scores[-1].step if watch.scores else 0
        score = score_split(
            copy.model, tokenizer, val_rows, step=step, max_new_tokens=cfg.evaluate.max_new_tokens,
            batch_size=cfg.evaluate.batch_size, backend=cfg.runtime.rollout_backend,
            judge_timeout=cfg.evaluate.judge_timeout, task=task,
        )  # fmt: skip
        score.reward = mean_reward_since(history, previous) if step > 0 else None
        alarms = watch.add(score)
        if watch.selected is score and (world.is_main or sharded):  # every rank gathers under FSDP
            weights = sharding.full_trainable_state(model)
            if world.is_main:
                checkpoint.save_best(paths.checkpoints_dir, step, weights, score.accuracy)
        if not world.is_main:
            return
        logger.metrics(step, score.metrics())
        log.info(
            "validation at step %d: accuracy %.3f (lenient %.3f, format %.3f) on %d problems",
            step, score.accuracy, score.lenient_accuracy, score.format_rate, len(val_rows),
        )  # fmt: skip
        for message in alarms:
            log.warning(message)
            logger.tags({"decline_alarm": "true", "decline_alarm_message": message[:5000]})

    try:
        if world.is_main:
            log.info("training %d steps from step %d: %s", t.steps, start, _plan(cfg))
            if disagreement:
                log.warning(disagreement)
                logger.tags({"task_warning": disagreement[:5000]})
            if inert := on_policy_knobs_warning(t):
                log.warning(inert)
        if val_rows and not watch.scores:
            validate(0)  # the reference's score: the baseline every later evaluation is judged against
        for step in range(start, t.steps):
            if t.time_budget_s is not None and history and history[-1]["wall_time"] >= t.time_budget_s:
                if world.is_main:
                    log.warning("stopping after step %d: train.time_budget_s=%g s used", step, t.time_budget_s)
                break
            if watch.stop_reason:  # a resumed run that had already stopped early
                break
            started = time.perf_counter()
            reset_peak_memory(device)

            # 1. Sample a group of completions per prompt from the current policy, and score them
            #    (with several processes, each samples its own slice of the prompts).
            # From the history, so that a resumed run draws exactly what an uninterrupted one would.
            signal_rate = 1.0 - history[-1]["frac_reward_zero_std"] if history else 1.0
            skipped_before = sampler.skipped
            batch = sample_batch(
                copy.model,
                tokenizer,
                sampler,
                cfg,
                autocast=False,
                step=step,
                world=world,
                signal_rate=signal_rate,
                task=task,
            )
            rollout = batch.rollout  # on the CPU, as data; `on_device` is what the training pass reads
            on_device = rollout.to(device)
            generated = time.perf_counter()

            # 2. Advantages relative to the group, from the whole batch's rewards; keep this process's.
            advantages, rewards, group_std = advantages_from_rewards(
                batch.per_function, weights, G, t.scale_rewards, t.multi_objective_aggregation
            )
            advantages = advantages[batch.local]
            mask = on_device.trained_mask.float()  # the model's own tokens (not a tool's replies)
            if t.mask_truncated_completions:
                mask = mask * (~on_device.truncated).float().unsqueeze(-1)
            # This process's part of the loss's normaliser (1 for one process): summed over the
            # processes, the weighted losses and their gradients are the whole batch's.
            share = distributed.loss_share(t.loss_type, mask, world)

            # Old log-probs are only needed when the policy moves between passes over this
            # batch (mu > 1); on-policy, logp.detach() is the same number at no extra cost.
            old_logp = None
            if t.num_iterations > 1:
                with torch.no_grad():
                    old_logp, _ = token_logps(model, on_device, t.bf16, temperature=t.temperature)
            ref_logp = None
            if t.beta != 0.0:
                scorer, disabled = policy.reference_view(model, reference)
                with torch.no_grad(), disabled:
                    ref_logp, _ = token_logps(scorer, on_device, t.bf16, temperature=t.temperature)
            is_weight, sampler_stats = None, {}

            # 3. mu clipped policy-gradient updates on this batch.
            model.train()
            for iteration in range(t.num_iterations):
                logp, entropy = token_logps(model, on_device, t.bf16, with_entropy=True, temperature=t.temperature)
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
                loss, stats = grpo_loss(
                    logp,
                    logp.detach() if old_logp is None else old_logp,
                    advantages.to(device),
                    mask,
                    ref_logp=ref_logp,
                    beta=t.beta,
                    epsilon_low=t.epsilon,
                    epsilon_high=eps_high,
                    loss_type=t.loss_type,
                    importance_sampling_level=t.importance_sampling_level,
                    max_completion_length=t.max_completion_length,
                    is_weight=is_weight,
                    delta=t.delta,
                    entropy=entropy,
                    top_entropy_quantile=t.top_entropy_quantile,
                    # the quantile is over the whole batch's tokens, on every process (as TRL gathers them)
                    entropy_pool=world.gather(entropy.detach()[mask.bool()]) if t.top_entropy_quantile < 1.0 else None,
                    entropy_coef=t.entropy_coef,
                    sapo_temperature_pos=t.sapo_temperature_pos,
                    sapo_temperature_neg=t.sapo_temperature_neg,
                )
                # A process that kept no group adds nothing, but joins the sum below (under FSDP, in backward).
                if rollout.rows or sharded:
                    (loss * share).backward()
                if not sharded:  # FSDP has summed them already, each rank its shard
                    world.all_reduce_grads(params)
                grad_norm = sharding.clip_grad_norm(params, t.max_grad_norm)
                check_finite(step + 1, loss, grad_norm)  # before the step: the weights stay as they were
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            check_finite(step + 1, None, None, params)
            copy.sync()  # the next rollout samples from the updated policy

            # 4. Log what the field looks at.
            elapsed = world.max(time.perf_counter() - started)
            metrics = step_metrics(
                batch=batch,
                rewards=rewards,
                group_std=group_std,
                reward_names=[s.name for s in t.rewards],
                loss=float(loss.detach()),
                share=share,
                stats=stats,
                entropy=entropy,
                mask=mask,
                sampler_stats=sampler_stats,
                skipped=sampler.skipped - skipped_before,
                grad_norm=grad_norm,
                learning_rate=scheduler.get_last_lr()[0],
                elapsed=elapsed,
                generation_time=generated - started,
                world=world,
                tools=bool(task.tools),
            )
            metrics.update(peak_memory_metrics(device))  # the GPU's, per step (nothing on the CPU)
            # Cumulative training time, carried across resumes: curves are drawn against it.
            metrics["wall_time"] = (history[-1]["wall_time"] if history else 0.0) + elapsed
            history.append({"step": step + 1, **metrics})
            if world.is_main:
                if (step + 1) % every == 0 or step == start or step + 1 == t.steps:
                    log.info(progress_line(step + 1, t.steps, metrics))
                for warning in (
                    flat_groups_warning(step + 1, batch, t) if step > start else None,
                    truncation_warning(history, t),
                ):
                    if warning:
                        log.warning(warning)
            logger.step(step + 1, metrics, batch.rows, rollout.transcripts, rewards[batch.local], advantages)
            # The rollout ledger (ledger.py): this step's completions, scores and advantages, every
            # process's slice, written by rank 0.
            slices = []
            if ledger.keeps(step + 1, t.ledger_every):
                slices = world.gather_objects(
                    ledger.table(step + 1, batch.rows, rollout, batch.per_function[batch.local],
                                 [s.name for s in t.rewards], rewards[batch.local], advantages,
                                 positions=batch.local.nonzero().squeeze(-1))
                )  # fmt: skip
            if world.is_main:
                ledger.record(ledger.ledger_dir(paths.root), step + 1, t.ledger_every, partial(ledger.merge, slices))

            # 5. Validation: the held-out skill, not the reward (validation.py says why).
            stop = False
            if val_rows and t.eval_every and (step + 1) % t.eval_every == 0:
                validate(step + 1)
                stop = watch.should_stop(t.early_stopping_patience)  # decided before the checkpoint keeps it
                if stop and world.is_main:
                    log.warning(watch.stop_reason or "")
                    logger.tags({"stop_reason": watch.stop_reason or ""})

            # 6. Checkpoint for exact resume.
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < t.steps:
                save_checkpoint(
                    paths, cfg, step + 1, key, model, optimizer, scheduler, sampler, history, logger.run_id, watch,
                    world,
                )  # fmt: skip
            if stop:
                break
        done = int(history[-1]["step"]) if history else start
        if val_rows and (not watch.scores or watch.scores[-1].step != done):
            validate(done)
    except BaseException as exc:
        logger.fail(isinstance(exc, KeyboardInterrupt))
        raise
    finally:
        samplers.close()

    final = {k: v for k, v in history[-1].items() if k != "step"} if history else {}
    save_checkpoint(paths, cfg, done, key, model, optimizer, scheduler, sampler, history, logger.run_id, watch, world)
    if sharded:  # rank 0 goes on with the policy whole, as one plain model on the CPU (None on the others)
        model = sharding.gathered_policy(model, cfg, paths, world)
    if world.is_main:
        # The policy that leaves `train`: the selected validated step's weights (validation.py), or the last step's.
        selected = done
        if t.select == "best" and watch.selected is not None and watch.selected.step != done:
            selected = checkpoint.load_best(paths.checkpoints_dir, model)
            log.warning(
                "selected step %d (validation accuracy %.3f) over the last step %d (%.3f); train.select=last "
                "keeps the last",
                selected, watch.selected.accuracy, done, watch.scores[-1].accuracy,
            )  # fmt: skip
        with staged_dir(paths.policy_dir) as staging:
            policy.save(model, tokenizer, staging)
        spent = sum(h["step_time"] for h in history)
        validation = watch.summary(spent) if watch.scores else None
        summary = {
            **final,
            "steps": done,
            "select": t.select,
            "selected_step": selected,
            "validation": validation,
            "mlflow_run_id": logger.run_id,
            "task": task.name,
            "verifiers": verifier_versions(task, [s.name for s in t.rewards]),  # pipelines/verifiers/versions.py
        }
        write_summary(paths, summary)  # reports/train.json, and its headline figures in metrics/train.json
        write_text(paths.train_plot, history_csv(history, task.correctness))
        write_text(paths.val_plot, scores_csv(watch.scores, history))
        if validation:
            logger.tags({"selected_step": str(selected), "validation_time_share": f"{validation['time_share']:.3f}"})
        logger.tags({"task": task.name, **{f"verifier/{k}": v for k, v in summary["verifiers"].items()}})
        logger.checkpoint_models(watch.scores, selected, model, tokenizer)  # each validated step (logged_models.py)
        logger.finish(training_curves(history, paths.train_curves, watch.scores), summary)
    return TrainResult(steps=done, final_reward=final.get("reward", math.nan), run_id=logger.run_id, resumed_from=start)


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
