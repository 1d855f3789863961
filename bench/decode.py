"""Decoding with shared-prefix attention against the repeated KV cache, alternating in one process.

For each setting (prompts x G = 8 completions of the embedded SmolLM2-135M, the sampling copy in
bf16 where the CPU has bf16 instructions, as training samples), the same call runs with the
prompt's cache repeated per completion and with one copy per group (pipelines/generation/shared_prefix.py),
alternating, best of `--repeats`. It also reports how far each sampler's log-probs are from the
trained model's (as the trainer computes them) on its own completions, the mismatch the sampling correction weighs.

    .venv/bin/python bench/decode.py   # -> bench/results/<machine>/decode.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_vs_trl import QUIET  # noqa: E402
from bench.learning_run import prepare  # noqa: E402
from bench.machine import describe, results_dir  # noqa: E402

FILLER = "You are a careful assistant who solves arithmetic step by step and checks every result twice."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--prompts", type=int, nargs="+", default=[2, 16], help="prompts per call (the demo samples 2 a step)"
    )
    ap.add_argument(
        "--system-repeats",
        type=int,
        nargs="+",
        default=[0, 16],
        help="filler sentences in a system prompt (0 = the task's ~90-token prompt; 16 = ~380 tokens)",
    )
    ap.add_argument(
        "--min-tokens",
        type=int,
        nargs="+",
        default=[48, 0],
        help="48 = every completion 48 tokens (identical work); 0 = natural lengths",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=results_dir() / "decode.json", help="default: bench/results/<machine>/")
    args = ap.parse_args()
    os.environ.update(QUIET)
    import torch

    from pipelines import config
    from pipelines.generation import shared_prefix
    from pipelines.generation.lean_decode import prompt_seed
    from pipelines.generation.rollout import generate
    from pipelines.generation.sampling_copy import SamplingCopy
    from pipelines.grpo import policy
    from pipelines.grpo.logprobs import token_logps
    from pipelines.io import read_jsonl
    from pipelines.paths import Paths

    torch.set_num_threads(2)
    root = prepare(Path(tempfile.mkdtemp(prefix="grpo-decode-")), [])
    cfg = config.load(root / "params.yaml", ["train.max_completion_length=48"])
    trained, tokenizer, _ = policy.build(cfg, Paths(root))
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    shared = SamplingCopy(trained, dtype).model
    assert shared_prefix.enabled(shared), "the embedded model should take shared-prefix attention"
    repeated = copy.deepcopy(shared)
    repeated.set_attn_implementation("sdpa")
    rows = read_jsonl(root / "data/validated/train.jsonl")
    results = []
    for n_prompts in args.prompts:
        for filler in args.system_repeats:
            system = [{"role": "system", "content": " ".join([FILLER] * filler)}] if filler else []
            prompts = [system + r["prompt"] for r in rows[:n_prompts]]
            for min_tokens in args.min_tokens:
                point = {"prompts": n_prompts, "completions": n_prompts * 8, "min_tokens": min_tokens}
                for repeat in range(args.repeats):
                    for name, model in (("repeated", repeated), ("shared", shared)):
                        started = time.perf_counter()
                        out = generate(
                            model,
                            tokenizer,
                            prompts,
                            num_generations=8,
                            max_new_tokens=48,
                            do_sample=True,
                            seeds=[prompt_seed(0, repeat, i) for i in range(n_prompts)],
                            min_new_tokens=min_tokens,
                        )
                        seconds = time.perf_counter() - started
                        # Natural lengths differ between the two (bf16 numerics sample other tokens), and a
                        # call lasts as long as its longest completion: compare seconds per decoding step too.
                        point[f"{name}_s"] = min(seconds, point.get(f"{name}_s", float("inf")))
                        step_ms = 1000 * seconds / out.completion_ids.size(1)
                        point[f"{name}_ms_per_step"] = min(step_ms, point.get(f"{name}_ms_per_step", float("inf")))
                        point["prompt_tokens"] = int(out.prompt_mask[0].sum())
                        point[f"{name}_tokens"] = int(out.lengths.sum())
                        if repeat == 0:
                            with torch.no_grad():
                                logp, _ = token_logps(trained, out, bf16=cfg.train.bf16)
                            mask = out.completion_mask.bool()
                            point[f"{name}_logp_diff"] = float((out.sampler_logps - logp)[mask].abs().mean())
                point["speedup"] = point["repeated_s"] / point["shared_s"]
                point["speedup_per_step"] = point["repeated_ms_per_step"] / point["shared_ms_per_step"]
                print(json.dumps(point), flush=True)
                results.append(point)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": describe(2), "sampler_dtype": str(dtype), "results": results}, indent=2))


if __name__ == "__main__":
    main()
