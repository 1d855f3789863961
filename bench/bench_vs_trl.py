"""Benchmark: this engine vs Hugging Face TRL's GRPOTrainer on identical work, alternating in one process tree.

Work: the embedded SmolLM2-135M-Instruct (pinned snapshot), LoRA r=16 on all linear layers, G = 8,
one prompt per step (multiplication problems with one worked example), up to 64 completion tokens,
the same prompts in the same order and the same seed, `--steps` steps. Each run is a child process
(so peak memory is per run); runs alternate TRL, ours, TRL, ours... TRL is tried in bf16 with and
without gradient checkpointing (its default is on) and in fp32 with and without it; its fastest
setting counts (bf16 only on CPUs with bf16 instructions, see pipelines/precision.py). Ours runs
with params.yaml's `train.bf16: auto`.

    .venv/bin/python bench/bench_vs_trl.py --steps 10 --rounds 2   # -> bench/results/<machine>/results.json

The two engines sample different completions (their random streams differ), so a step's length,
and its time, differ too; `--min-tokens 64` holds EOS back in both so every completion is 64
tokens and a step is exactly the same work (tokens per second compares either way).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import describe, results_dir  # noqa: E402

QUIET = {
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
}
OVERRIDES = [
    "data.generator.operators=['*']",
    "data.generator.num_rows=400",
    "train.prompts_per_step=1",
    "train.num_generations=8",
    "train.max_completion_length=64",
    "train.lora.r=16",
    "train.lora.alpha=32",
    "train.beta=0.0",
    "train.learning_rate=0.0002",
    "train.loss_type=grpo",
    "train.dynamic_sampling=false",  # identical work: TRL samples no extra prompts for flat groups
    "train.checkpoint_every=0",
    "train.log_samples=0",
]


def prepare(workdir: Path) -> Path:
    """A project with validated data and the pinned embedded reference (made once, shared by all runs)."""
    from pipelines import config
    from pipelines.data import validate
    from pipelines.paths import Paths
    from pipelines.snapshot import stage as snapshot_stage

    root = workdir / "project"
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    cfg = config.load(root / "params.yaml", OVERRIDES)
    validate.run(cfg, Paths(root))
    snapshot_stage.run(cfg.snapshot, Paths(root))
    return root


def child_ours(root: Path, steps: int, threads: int, extra: list[str]) -> dict:
    import torch

    from pipelines import config
    from pipelines.grpo import trainer
    from pipelines.paths import Paths

    cfg = config.load(
        root / "params.yaml",
        [*OVERRIDES, f"train.steps={steps}", f"runtime.num_threads={threads}", "train.resume=false", *extra],
    )
    paths = Paths(root / f"ours-{os.getpid()}")
    paths.root.mkdir()
    for name in ("data", "models"):
        os.symlink(root / name, paths.root / name)
    trainer.run(cfg, paths, log_to_mlflow=False)
    import csv

    rows = list(csv.DictReader(paths.train_plot.open()))
    return {
        "step_times": [float(r["step_time"]) for r in rows],
        "tokens": [float(r["completions/mean_length"]) * cfg.train.num_generations for r in rows],
        "generation_times": [float(r["generation_time"]) for r in rows],
        "rewards": [float(r["reward"]) for r in rows],
        "torch_threads": torch.get_num_threads(),
    }


def child_trl(root: Path, steps: int, threads: int, bf16: bool, checkpointing: bool, min_tokens: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pipelines import config
    from pipelines.grpo.prompt_sampler import PromptSampler
    from pipelines.io import read_jsonl
    from pipelines.verifiers.rewards import accuracy_reward, format_reward

    torch.set_num_threads(threads)
    cfg = config.load(root / "params.yaml", [*OVERRIDES, f"train.steps={steps}"])
    # The same prompts in the same order as our sampler gives them.
    sampler = PromptSampler(read_jsonl(root / "data/validated/train.jsonl"), cfg.train.seed)
    rows = sampler.take(steps)
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    ref = root / "models" / "reference"
    tokenizer = AutoTokenizer.from_pretrained(ref)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(root / f"trl-{os.getpid()}"),
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=64,
        max_steps=steps,
        learning_rate=2e-4,
        beta=0.0,
        loss_type="grpo",
        bf16=bf16,
        use_cpu=True,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=cfg.train.seed,
        temperature=1.0,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        reward_weights=[1.0, 0.2],
        gradient_checkpointing=checkpointing,  # TRL's default is on; off is faster when memory allows
        generation_kwargs={"min_new_tokens": min_tokens} if min_tokens else None,
    )
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                tokens.append(logs["completions/mean_length"] * 8)

    def accuracy(prompts, completions, answer, **kw):
        return accuracy_reward(prompts, completions, answer=answer)

    def fmt(prompts, completions, **kw):
        return format_reward(prompts, completions)

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy, fmt],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[Clock()],
    )
    trainer.train()
    return {"step_times": times, "tokens": tokens, "torch_threads": torch.get_num_threads()}


def run_child(kind: str, root: Path, steps: int, threads: int, setting: str, min_tokens: int) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--root",
            str(root),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
            "--setting",
            setting,
            "--min-tokens",
            str(min_tokens),
        ],
        env={**os.environ, **QUIET},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(result: dict) -> dict:
    steps = result["step_times"][1:] or result["step_times"]  # the first step pays one-off warm-up
    toks = result["tokens"][1 : 1 + len(steps)] if len(result["tokens"]) > 1 else result["tokens"]
    return {
        "step_s": statistics.mean(steps),
        "tokens_per_s": sum(toks) / sum(steps[: len(toks)]),
        "peak_rss_gb": result["peak_rss_kb"] / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--root", type=Path)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--setting", default="")
    ap.add_argument(
        "--min-tokens",
        type=int,
        default=0,
        help="EOS held back for this many tokens in both engines "
        "(64 = every completion the full length, so a step is the same work)",
    )
    ap.add_argument(
        "--out", type=Path, default=results_dir() / "results.json", help="default: bench/results/<machine>/"
    )
    args = ap.parse_args()
    os.environ.update(QUIET)
    if args.child:
        if args.child == "ours":
            extra = [s for s in args.setting.split(";") if s] + [f"train.min_completion_length={args.min_tokens}"]
            result = child_ours(args.root, args.steps, args.threads, extra)
        else:
            result = child_trl(
                args.root,
                args.steps,
                args.threads,
                bf16=args.setting.startswith("bf16"),
                checkpointing=not args.setting.endswith("nogc"),
                min_tokens=args.min_tokens,
            )
        result["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(result))
        return
    workdir = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    root = prepare(workdir)
    from pipelines.precision import native_bf16

    # TRL's bf16 settings only where the CPU has bf16 instructions: elsewhere its bf16 matmuls take
    # a slow fallback (pipelines/precision.py), minutes a step, and fp32 is its fastest by far.
    trl = ["bf16", "bf16-nogc", "fp32", "fp32-nogc"] if native_bf16() else ["fp32", "fp32-nogc"]
    settings = [(f"trl-{trl[0]}", "trl", trl[0]), ("ours", "ours", ""), *((f"trl-{s}", "trl", s) for s in trl[1:])]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in settings}
    for r in range(args.rounds):
        for name, kind, setting in settings:
            res = run_child(kind, root, args.steps, args.threads, setting, args.min_tokens)
            runs[name].append(summary(res))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    agg = {k: {m: statistics.mean(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    trl_best = min((k for k in agg if k.startswith("trl")), key=lambda k: agg[k]["step_s"])
    report = {
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "min_tokens": args.min_tokens,
        "runs": agg,
        "trl_counted": trl_best,
        "ratio_step_time": agg[trl_best]["step_s"] / agg["ours"]["step_s"],
        "ratio_tokens_per_s": agg["ours"]["tokens_per_s"] / agg[trl_best]["tokens_per_s"],
        "machine": describe(args.threads),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
