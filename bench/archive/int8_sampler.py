"""Would int8 weights make the fp32 sampling copy faster on a CPU without bf16 instructions?

On AVX2-only CPUs the sampler runs in fp32 and decoding is bound by reading weights (the fp32
lm_head alone is 113 MB a token). Two ways to read a quarter of those bytes, measured here:

1. PyTorch's dynamic quantization (`torch.ao.quantization.quantize_dynamic`, fbgemm, per-channel
   int8 weights, activations quantized per tensor at run time) of the whole sampling copy: decode
   time against fp32 on the same prompts, and how far the quantized sampler's log-probs are from the
   trained model's on its own completions (the mismatch `train.sampling_correction` would weigh).
2. The weight-only int8 kernel (`torch._weight_int8pack_mm`, int8 weights with a per-row scale,
   fp32 activations, as gpt-fast uses) on the model's matmul shapes at decoding batch sizes.

    .venv/bin/python bench/archive/int8_sampler.py   # -> bench/results/<machine>/int8-sampler.json

A one-off probe, measured and dropped (bench/RESULTS.md, "Ideas dropped"), kept so it can be re-measured.
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.bench_vs_trl import QUIET  # noqa: E402
from bench.learning_run import prepare  # noqa: E402
from bench.machine import describe, results_dir  # noqa: E402


def _best_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, 1000 * (time.perf_counter() - started))
    return best


def kernels() -> list[dict]:
    """fp32 matmul against the weight-only int8 kernel, rows x in x out as SmolLM2-135M decodes."""
    import torch

    points = []
    for rows, k, n in [(16, 576, 49152), (64, 576, 49152), (16, 576, 1536), (16, 1536, 576), (16, 576, 576)]:
        w, x = torch.randn(n, k), torch.randn(rows, k)
        scale = w.abs().amax(1) / 127
        wq = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
        point = {"rows": rows, "in": k, "out": n, "fp32_ms": _best_ms(lambda x=x, w=w: x @ w.t())}
        point["int8_weight_only_ms"] = _best_ms(lambda x=x, wq=wq, scale=scale: torch._weight_int8pack_mm(x, wq, scale))
        print(json.dumps(point), flush=True)
        points.append(point)
    return points


def sampler(repeats: int) -> list[dict]:
    """Decode time and log-prob mismatch of the dynamically quantized sampling copy against fp32."""
    import torch

    from pipelines import config
    from pipelines.generation.lean_decode import prompt_seed
    from pipelines.generation.rollout import generate
    from pipelines.generation.sampling_copy import SamplingCopy
    from pipelines.grpo import policy
    from pipelines.grpo.logprobs import token_logps
    from pipelines.io import read_jsonl
    from pipelines.paths import Paths

    root = prepare(Path(tempfile.mkdtemp(prefix="grpo-int8-")), [])
    cfg = config.load(root / "params.yaml", ["train.max_completion_length=48", "train.bf16=false"])
    trained, tokenizer, _ = policy.build(cfg, Paths(root))
    fp32 = SamplingCopy(trained, torch.float32).model
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear: qconfig}, dtype=torch.qint8)
    rows = read_jsonl(root / "data/validated/train.jsonl")
    points = []
    for n_prompts in (2, 16):
        prompts = [r["prompt"] for r in rows[:n_prompts]]
        point: dict = {"prompts": n_prompts, "completions": 8 * n_prompts}
        for repeat in range(repeats):
            for name, model in (("fp32", fp32), ("int8_dynamic", int8)):
                started = time.perf_counter()
                generate(
                    model,
                    tokenizer,
                    prompts,
                    num_generations=8,
                    max_new_tokens=48,
                    do_sample=True,
                    seeds=[prompt_seed(0, repeat, i) for i in range(n_prompts)],
                    min_new_tokens=48,
                )
                point[f"{name}_s"] = min(time.perf_counter() - started, point.get(f"{name}_s", float("inf")))
            if repeat == 0:
                # Natural lengths for the mismatch: with min_new_tokens the sampler masks EOS and its
                # log-probs differ from the trained model's by construction.
                for name, model in (("fp32", fp32), ("int8_dynamic", int8)):
                    out = generate(
                        model,
                        tokenizer,
                        prompts,
                        num_generations=8,
                        max_new_tokens=48,
                        do_sample=True,
                        seeds=[prompt_seed(0, 0, i) for i in range(n_prompts)],
                    )
                    with torch.no_grad():
                        logp, _ = token_logps(trained, out, bf16=False)
                    diff = (out.sampler_logps - logp)[out.completion_mask.bool()].abs()
                    point[f"{name}_logp_diff_mean"] = float(diff.mean())
                    point[f"{name}_logp_diff_max"] = float(diff.max())
        point["speedup"] = point["fp32_s"] / point["int8_dynamic_s"]
        print(json.dumps(point), flush=True)
        points.append(point)
    return points


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--out", type=Path, default=results_dir() / "int8-sampler.json", help="default: bench/results/<machine>/"
    )
    args = ap.parse_args()
    os.environ.update(QUIET)
    import torch

    torch.set_num_threads(2)
    result = {"machine": describe(2), "kernels": kernels(), "sampler": sampler(args.repeats)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
