"""Stage 3, train: GRPO with a LoRA adapter on the pinned reference.

One flat loop: sample a group of completions per prompt -> score them with the verifiers ->
group-relative advantages -> `num_iterations` clipped policy-gradient updates -> log.
"""

from __future__ import annotations

import csv
import io
import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.config import Config
from pipelines.grpo.advantages import combine_rewards, group_advantages
from pipelines.grpo.loss import grpo_loss
from pipelines.grpo.rollout import generate, token_logps
from pipelines.io import read_jsonl, staged_dir, write_json, write_text
from pipelines.models import add_lora, load_reference, set_threads
from pipelines.paths import Paths
from pipelines.plots import training_curves
from pipelines.snapshot import verify
from pipelines.verifiers.rewards import get_reward


@dataclass
class TrainResult:
    steps: int
    final_reward: float
    run_id: str | None


def prompt_stream(rows: list[dict[str, Any]], batch: int, seed: int):
    """Endless batches of rows: a fresh seeded shuffle every epoch."""
    rng = random.Random(seed)
    epoch_rows: list[dict[str, Any]] = []
    while True:
        out = []
        while len(out) < batch:
            if not epoch_rows:
                epoch_rows = rows[:]
                rng.shuffle(epoch_rows)
            out.append(epoch_rows.pop())
        yield out


def score(cfg: Config, rows: list[dict[str, Any]], texts: list[str], group: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted rewards for every completion, and each reward function's mean."""
    prompts = [r["prompt"] for r in rows for _ in range(group)]
    columns = {k: [r[k] for r in rows for _ in range(group)] for k in rows[0] if k not in {"prompt"}}
    per_fn, means = [], {}
    for spec in cfg.train.rewards:
        values = get_reward(spec.name)(prompts, texts, **columns)
        if len(values) != len(texts):
            raise ValueError(f"reward function {spec.name!r} returned {len(values)} values for {len(texts)} completions")
        column = torch.tensor([math.nan if v is None else float(v) for v in values])
        per_fn.append(column)
        means[f"rewards/{spec.name}/mean"] = float(column.nanmean()) if not column.isnan().all() else math.nan
    weights = torch.tensor([s.weight for s in cfg.train.rewards])
    return combine_rewards(torch.stack(per_fn, dim=1), weights), means


def run(cfg: Config, paths: Paths, log_to_mlflow: bool = True) -> TrainResult:
    from tqdm.auto import tqdm

    t = cfg.train
    set_threads(cfg.runtime.num_threads)
    torch.manual_seed(t.seed)
    verify(paths.reference_dir)  # the reference must be exactly the pinned one
    model, tokenizer = load_reference(paths.reference_dir, cfg.snapshot.trust_remote_code)
    model = add_lora(model, t.lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (t.warmup_steps + 1)))
    rows = read_jsonl(paths.train_split)
    batches = prompt_stream(rows, t.prompts_per_step, t.seed)
    eps_high = t.epsilon if t.epsilon_high is None else t.epsilon_high

    run_id = None
    if log_to_mlflow:
        import mlflow

        from pipelines.tracking import flatten, setup

        setup(paths.root, cfg.registry.experiment)
        active = mlflow.start_run(run_name=f"grpo-{cfg.snapshot.source}-{t.steps}steps")
        run_id = active.info.run_id
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.model_dump()).items()})

    history: list[dict[str, float]] = []
    bar = tqdm(range(t.steps), desc="GRPO", unit="step")
    try:
        for step in bar:
            started = time.perf_counter()
            batch = next(batches)
            G = t.num_generations

            # 1. Sample a group of completions per prompt from the current policy.
            model.eval()
            rollout = generate(
                model, tokenizer, [r["prompt"] for r in batch], num_generations=G, max_new_tokens=t.max_completion_length,
                do_sample=True, temperature=t.temperature, top_p=t.top_p, top_k=t.top_k, bf16=t.bf16,
            )
            generated = time.perf_counter()

            # 2. Score with the verifiers; 3. advantages relative to the group.
            rewards, reward_means = score(cfg, batch, rollout.texts, G)
            advantages, group_std = group_advantages(rewards, G, t.scale_rewards)
            mask = rollout.completion_mask.float()
            if t.mask_truncated_completions:
                mask = mask * (~rollout.truncated).float().unsqueeze(-1)

            # Old log-probs are only needed when the policy moves between passes over this
            # batch (mu > 1); on-policy, logp.detach() is the same number at no extra cost.
            old_logp = None
            if t.num_iterations > 1:
                with torch.no_grad():
                    old_logp, _ = token_logps(model, rollout, t.bf16)
            ref_logp = None
            if t.beta != 0.0:
                with torch.no_grad(), model.disable_adapter():  # LoRA off = the reference, no second copy
                    ref_logp, _ = token_logps(model, rollout, t.bf16)

            # 4. mu clipped policy-gradient updates on this batch.
            model.train()
            for _ in range(t.num_iterations):
                logp, entropy = token_logps(model, rollout, t.bf16, with_entropy=True)
                loss, stats = grpo_loss(
                    logp, logp.detach() if old_logp is None else old_logp, advantages, mask,
                    ref_logp=ref_logp, beta=t.beta, epsilon_low=t.epsilon, epsilon_high=eps_high,
                    loss_type=t.loss_type, importance_sampling_level=t.importance_sampling_level,
                    max_completion_length=t.max_completion_length,
                )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            # 5. Log what the field looks at.
            elapsed = time.perf_counter() - started
            lengths = rollout.lengths.float()
            metrics = {
                "loss": float(loss.detach()),
                "reward": float(rewards.mean()),
                "reward_std": float(group_std.mean()),
                **reward_means,
                "frac_reward_zero_std": float((group_std < 1e-6).float().mean()),
                "kl": stats.kl,
                "clip_ratio/low_mean": stats.clip_low,
                "clip_ratio/high_mean": stats.clip_high,
                "clip_ratio/region_mean": stats.clip_region,
                "entropy": float((entropy * mask).sum() / mask.sum().clamp(min=1)),
                "completions/mean_length": float(lengths.mean()),
                "completions/clipped_ratio": float(rollout.truncated.float().mean()),
                "learning_rate": scheduler.get_last_lr()[0],
                "step_time": elapsed,
                "generation_time": generated - started,
                "tokens_per_second": float(lengths.sum()) / elapsed,
            }
            history.append({"step": step + 1, **metrics})
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", step_s=f"{elapsed:.1f}")
            if metrics["frac_reward_zero_std"] >= 0.75 and step > 0:
                bar.write(
                    f"step {step + 1}: {metrics['frac_reward_zero_std']:.0%} of groups have equal rewards, so the loss is "
                    "near zero; raise train.num_generations or train.temperature, or use harder prompts"
                )
            if log_to_mlflow:
                import mlflow

                mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)}, step=step + 1)
                if t.log_samples:
                    n = min(t.log_samples, len(rollout.texts))
                    mlflow.log_table(
                        {
                            "step": [step + 1] * n,
                            "prompt": [str(batch[i // G]["prompt"][-1]["content"]) if isinstance(batch[i // G]["prompt"], list) else batch[i // G]["prompt"] for i in range(n)],
                            "completion": rollout.texts[:n],
                            "reward": [float(r) for r in rewards[:n]],
                        },
                        artifact_file="completions.json",
                    )
    except BaseException:
        if log_to_mlflow:
            import mlflow

            mlflow.end_run(status="KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FAILED")
        raise
    finally:
        bar.close()

    with staged_dir(paths.policy_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    final = {k: v for k, v in history[-1].items() if k != "step"} if history else {}
    write_json(paths.train_metrics, {**final, "steps": t.steps, "mlflow_run_id": run_id})
    write_text(paths.train_plot, _csv(history))
    png = training_curves(history, paths.train_curves)
    if log_to_mlflow:
        import mlflow

        if png:
            mlflow.log_artifact(str(png), "plots")
        mlflow.end_run()
    return TrainResult(steps=t.steps, final_reward=final.get("reward", math.nan), run_id=run_id)


def _csv(history: list[dict[str, float]]) -> str:
    if not history:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()
