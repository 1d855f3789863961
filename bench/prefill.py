"""Greedy scoring of many prompts: the prefill's LM head, and the prompts' common opening run once.

Validation during training and `evaluate` decode dozens of different prompts in one call, on a
frozen model (the sampling copy; evaluate's decoding copies). For the demo task's validation split (64
rows, one call) and 256 of its test rows (calls of `evaluate.batch_size`), the embedded
SmolLM2-135M, frozen, in bf16 where the CPU has bf16 units and in fp32, alternating in one process,
best of `--repeats`:
- the prefill alone with `logits_to_keep` as a count (a sliced view reaches the LM head) and as
  indices (`lean_decode.last_positions`, a contiguous gather);
- greedy decoding up to `evaluate.max_new_tokens` with one pass per prompt and with the common
  opening (chat template's system prompt, worked example, "What is ") prefilled once
  (`lean_decode.prefill`, the default without per-prompt seeds), and how many answers differ.

    .venv/bin/python bench/prefill.py   # -> bench/results/<machine>/prefill.json
"""

from __future__ import annotations

import argparse
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
from bench.seeds import TASKS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=results_dir() / "prefill.json", help="bench/results/<machine>/")
    args = ap.parse_args()
    os.environ.update(QUIET)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines import config
    from pipelines.generation.lean_decode import common_opening, last_positions, sample
    from pipelines.generation.rollout import render_prompts
    from pipelines.io import read_jsonl
    from pipelines.paths import Paths

    torch.set_num_threads(2)
    results = []
    with tempfile.TemporaryDirectory(prefix="grpo-prefill-", ignore_cleanup_errors=True) as scratch:
        root = prepare(Path(scratch), TASKS["demo"])
        cfg = config.load(root / "params.yaml", TASKS["demo"])
        paths = Paths(root)
        snapshot = next(paths.root.glob("models/**/config.json")).parent
        tokenizer = AutoTokenizer.from_pretrained(snapshot)
        tokenizer.padding_side = "left"
        splits = {"validation": read_jsonl(paths.val_split), "test": read_jsonl(paths.eval_split)[:256]}
        dtypes = [torch.bfloat16, torch.float32] if cfg.train.bf16 else [torch.float32]
        for dtype in dtypes:
            model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=dtype).eval().requires_grad_(False)
            for split, rows in splits.items():
                batches = [
                    tokenizer(
                        render_prompts(tokenizer, [r["prompt"] for r in rows[i : i + cfg.evaluate.batch_size]]),
                        return_tensors="pt",
                        padding=True,
                        add_special_tokens=False,
                    )
                    for i in range(0, len(rows), cfg.evaluate.batch_size)
                ]
                first = batches[0]
                point = {
                    "dtype": str(dtype),
                    "split": split,
                    "rows": len(rows),
                    "prompt_tokens": int(first["attention_mask"][0].sum()),
                    "opening_tokens": common_opening(first["input_ids"], first["attention_mask"]),
                }
                answers = {}
                for _ in range(args.repeats):
                    for keep in ("count", "indices"):
                        began = time.perf_counter()
                        for encoded in batches:
                            with torch.no_grad():
                                model(
                                    **encoded,
                                    position_ids=(encoded["attention_mask"].cumsum(-1) - 1).clamp(min=0),
                                    logits_to_keep=1
                                    if keep == "count"
                                    else last_positions(encoded["input_ids"].size(1)),
                                )
                        key = f"prefill_{keep}_s"
                        point[key] = min(time.perf_counter() - began, point.get(key, float("inf")))
                    for name, share in (("one_pass", False), ("shared_opening", True)):
                        began, texts = time.perf_counter(), []
                        for encoded in batches:
                            out, _ = sample(
                                model,
                                encoded["input_ids"],
                                encoded["attention_mask"],
                                num_generations=1,
                                max_new_tokens=cfg.evaluate.max_new_tokens,
                                eos_id=tokenizer.eos_token_id,
                                pad_id=tokenizer.pad_token_id,
                                do_sample=False,
                                share_opening=share,
                            )
                            texts += tokenizer.batch_decode(out, skip_special_tokens=True)
                        point[f"{name}_s"] = min(time.perf_counter() - began, point.get(f"{name}_s", float("inf")))
                        answers[name] = texts
                point["prefill_speedup"] = point["prefill_count_s"] / point["prefill_indices_s"]
                point["speedup"] = point["one_pass_s"] / point["shared_opening_s"]
                point["answers_differ"] = sum(a != b for a, b in zip(*answers.values(), strict=True))
                print(json.dumps(point), flush=True)
                results.append(point)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": describe(2), "results": results}, indent=2))


if __name__ == "__main__":
    main()
