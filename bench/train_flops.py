"""How close the training pass comes to the machine's bf16 matmul peak.

Measures, in one process: the bf16 matmul peak (best of several large square matmuls), then for
1, 2, 4 and 8 prompts x G = 8 real sampled completions (embedded SmolLM2-135M, LoRA r=16 on all
linear layers, frozen base in bf16, up to 64 tokens) the training pass exactly as the trainer runs
it: log-probs + entropy, the GRPO loss, backward, gradient clipping and the AdamW step. FLOPs are
counted by torch's FlopCounterMode (matmuls and attention, forward and backward), so the figure
is useful work per second; sampling is timed separately (decoding is memory-bound by nature).
A profiled pass also gives the matmuls' own time: FLOPs over that time is the rate the pass could
reach if every other op (norms, rotary, casts, softmax, the optimiser) cost nothing.

    .venv/bin/python bench/train_flops.py   # -> bench/results/<machine>/train_flops.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_vs_trl import OVERRIDES, QUIET, prepare  # noqa: E402
from bench.machine import describe, results_dir  # noqa: E402

MATMULS = {
    "aten::mm",
    "aten::bmm",
    "aten::addmm",
    "aten::matmul",
    "aten::linear",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
}


def matmul_peak(n: int = 2048, repeats: int = 8) -> float:
    """bf16 FLOP/s of the best of `repeats` n x n x n matmuls (after a warm-up)."""
    import torch

    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def train_pass(root: Path, prompts: int, repeats: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines import config
    from pipelines.generation.rollout import generate
    from pipelines.generation.sampling_copy import SamplingCopy
    from pipelines.grpo import policy
    from pipelines.grpo.logprobs import token_logps
    from pipelines.grpo.loss import grpo_loss
    from pipelines.grpo.prompt_sampler import PromptSampler
    from pipelines.io import read_jsonl
    from pipelines.paths import Paths

    cfg = config.load(root / "params.yaml", [*OVERRIDES, f"train.prompts_per_step={prompts}"])
    t = cfg.train
    model, tokenizer, _ = policy.build(cfg, Paths(root))
    params = policy.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate)
    rows = PromptSampler(read_jsonl(root / "data/validated/train.jsonl"), t.seed).take(prompts)
    sampler_model = SamplingCopy(model, torch.bfloat16)
    started = time.perf_counter()
    rollout = generate(
        sampler_model.model,
        tokenizer,
        [r["prompt"] for r in rows],
        num_generations=t.num_generations,
        max_new_tokens=t.max_completion_length,
        do_sample=True,
        seeds=list(range(prompts)),
    )
    sampling = time.perf_counter() - started
    mask = rollout.completion_mask.float()
    advantages = torch.randn(mask.size(0))

    def step() -> None:
        logp, _ = token_logps(model, rollout, t.bf16, with_entropy=True)
        loss, _ = grpo_loss(
            logp, logp.detach(), advantages, mask, loss_type=t.loss_type, max_completion_length=t.max_completion_length
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step()  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    # The matmuls' own time in one pass: even if every other op were free, the pass could not
    # run faster than its FLOPs over this time (the bound reported beside the measured rate).
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    matmul_s = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMULS) / 1e6
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {
        "prompts": prompts,
        "completions": int(mask.size(0)),
        "completion_tokens": int(mask.sum()),
        "sampling_s": sampling,
        "train_pass_s": seconds,
        "train_pass_times": times,
        "flops": counter.get_total_flops(),
        "flop_per_s": counter.get_total_flops() / seconds,
        "matmul_s": matmul_s,
        "matmul_flop_per_s": counter.get_total_flops() / matmul_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", type=Path, default=results_dir() / "train_flops.json", help="default: bench/results/<machine>/"
    )
    args = ap.parse_args()
    os.environ.update(QUIET)
    import torch

    torch.set_num_threads(args.threads)
    root = prepare(Path(tempfile.mkdtemp(prefix="grpo-flops-")))
    peak = matmul_peak()
    print(f"bf16 matmul peak: {peak / 1e9:.0f} GFLOP/s ({args.threads} threads)", flush=True)
    runs = []
    for prompts in args.prompts:
        run = train_pass(root, prompts, args.repeats)
        run["fraction_of_peak"] = run["flop_per_s"] / peak
        run["matmul_fraction_of_peak"] = run["matmul_flop_per_s"] / peak
        runs.append(run)
        print(
            f"{prompts} x 8 completions, {run['completion_tokens']} completion tokens: "
            f"training pass {run['train_pass_s']:.2f} s, {run['flops'] / 1e9:.0f} GFLOP, "
            f"{run['flop_per_s'] / 1e9:.0f} GFLOP/s = {run['fraction_of_peak']:.0%} of peak "
            f"(sampling took {run['sampling_s']:.1f} s); its matmuls alone take {run['matmul_s']:.2f} s, "
            f"so with every other op free it would run at {run['matmul_fraction_of_peak']:.0%} of peak",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"machine": describe(args.threads), "threads": args.threads, "matmul_peak_flop_per_s": peak, "runs": runs},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
