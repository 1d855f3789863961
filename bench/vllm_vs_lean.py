"""Rollout throughput: the `vllm` backend (a vLLM CPU server on loopback) against `lean`, in one run.

The embedded SmolLM2-135M with a LoRA adapter (r=16, all linear layers, small random B so the
adapter is not a no-op), the demo's chat prompts, natural completion lengths up to 48 tokens,
sampling at temperature 1 with a seed per prompt: the rollout call a training step makes. Each cell
of the grid (prompts x G) is timed `--rounds` times after a warm-up call per backend, alternating
the backends; the median is kept. vLLM runs in fp32 on CPUs without bf16 units and in bf16 where
`bf16: auto` would use it, like the lean loop's sampling copy.

    .venv/bin/python bench/vllm_vs_lean.py            # needs `make vllm`

writes bench/results/<machine>/vllm_vs_lean.json.
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

from bench.bench_vs_trl import QUIET  # noqa: E402
from bench.machine import describe, results_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--generations", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=results_dir() / "vllm_vs_lean.json")
    args = ap.parse_args()
    os.environ.update(QUIET)

    import torch

    from pipelines import config
    from pipelines.data import validate
    from pipelines.generation.rollout import generate
    from pipelines.generation.sampling_copy import SamplingCopy
    from pipelines.generation.vllm_backend import RemotePolicy
    from pipelines.generation.vllm_server import vllm_session
    from pipelines.grpo import policy
    from pipelines.io import read_jsonl
    from pipelines.paths import Paths
    from pipelines.snapshot import stage as snapshot

    root = Path(tempfile.mkdtemp(prefix="grpo-vllm-bench-"))
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    cfg = config.load(root / "params.yaml", [f"runtime.vllm.python={REPO / '.venv-vllm/bin/python'}"])
    paths = Paths(root)
    validate.run(cfg, paths)
    snapshot.run(cfg.snapshot, paths)
    model, tokenizer, _ = policy.build(cfg, paths)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.01)
    rows = read_jsonl(paths.train_split)
    bf16 = cfg.train.bf16

    started = time.perf_counter()
    results: dict = {"machine": describe(torch.get_num_threads()), "bf16": bf16, "cells": []}
    with vllm_session(cfg.runtime.vllm, root, paths.reference_dir, cfg.train.lora.r, 0, bf16) as (client, base):
        results["vllm_start_s"] = time.perf_counter() - started
        remote = RemotePolicy(model, client, base, root / ".vllm" / "adapters")
        local = SamplingCopy(model, torch.bfloat16 if bf16 else torch.float32)
        engines = {"lean": ("lean", local.model), "vllm": ("vllm", remote.model)}

        def rollout(engine: str, prompts: int, g: int, seed: int) -> tuple[float, int]:
            backend, target = engines[engine]
            chunk = rows[seed * prompts % len(rows) :][:prompts]
            t = time.perf_counter()
            out = generate(
                target, tokenizer, [r["prompt"] for r in chunk], num_generations=g,
                max_new_tokens=args.max_new_tokens, do_sample=True, backend=backend,
                seeds=[1000 * seed + i for i in range(len(chunk))],
            )  # fmt: skip
            return time.perf_counter() - t, int(out.lengths.sum())

        for engine in engines:  # warm-up (vLLM's first request compiles and allocates)
            rollout(engine, 2, 8, 0)
        for p in args.prompts:
            for g in args.generations:
                cell: dict = {"prompts": p, "generations": g}
                for engine in engines:
                    cell[engine] = {"seconds": [], "tokens": []}
                for r in range(args.rounds):
                    for engine in engines:
                        s, n = rollout(engine, p, g, r + 1)
                        cell[engine]["seconds"].append(s)
                        cell[engine]["tokens"].append(n)
                for engine in engines:
                    e = cell[engine]
                    e["median_s"] = statistics.median(e["seconds"])
                    e["tokens_per_s"] = sum(e["tokens"]) / sum(e["seconds"])
                cell["vllm_speedup"] = cell["lean"]["median_s"] / cell["vllm"]["median_s"]
                results["cells"].append(cell)
                print(
                    f"{p:>3} prompts x G={g:<3} lean {cell['lean']['median_s']:6.2f} s "
                    f"({cell['lean']['tokens_per_s']:6.1f} tok/s)  vllm {cell['vllm']['median_s']:6.2f} s "
                    f"({cell['vllm']['tokens_per_s']:6.1f} tok/s)  vllm speed-up {cell['vllm_speedup']:.2f}x",
                    flush=True,
                )
        remote.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
