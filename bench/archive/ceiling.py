"""What sampling can reach on the held-out problems: greedy accuracy, pass@k and mean@k of the reference,
strict (`#### N`) and lenient (the last number in the text).

GRPO sharpens what the model already samples: a held-out problem that none of k samples gets
right is out of reach of a few minutes of RL on *other* problems. This prints, for the learning
run's task (or any `-S` overrides), the reference's greedy strict accuracy and, per temperature,
pass@k (some sample right) and mean@k (the average sample right) on the eval split, read strictly
and leniently. The lenient pass@k is the ceiling of a skill gain (not only the format).

    .venv/bin/python bench/archive/ceiling.py --k 16 --temperatures 1.0 0.7   # -> bench/results/<machine>/ceiling.json

A one-off probe (bench/RESULTS.md, "Ideas dropped"), kept so its numbers can be re-measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.bench_vs_trl import QUIET  # noqa: E402
from bench.learning_run import prepare  # noqa: E402
from bench.machine import describe, results_dir  # noqa: E402


def measure(root: Path, k: int, temperatures: list[float], max_new_tokens: int, batch: int) -> dict:
    import torch

    from pipelines.generation.rollout import generate
    from pipelines.generation.sampling_copy import SamplingCopy
    from pipelines.io import read_jsonl
    from pipelines.snapshot.loading import load_reference
    from pipelines.verifiers.math_answer import answers_match, last_number, strict_answer

    rows = read_jsonl(root / "data/validated/eval.jsonl")
    base, tokenizer = load_reference(root / "models/reference")
    # fp32, as learning_run.py scores its snapshots, so the two greedy figures agree.
    model = SamplingCopy(base, torch.float32).model

    def right(text: str, row: dict) -> bool:
        return answers_match(strict_answer(text), row["answer"])

    def lenient(text: str, row: dict) -> bool:
        return answers_match(last_number(text), row["answer"])

    greedy: list[bool] = []
    greedy_lenient: list[bool] = []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        out = generate(
            model,
            tokenizer,
            [r["prompt"] for r in chunk],
            num_generations=1,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        greedy += [right(t, r) for t, r in zip(out.texts, chunk, strict=True)]
        greedy_lenient += [lenient(t, r) for t, r in zip(out.texts, chunk, strict=True)]
    result = {
        "problems": len(rows),
        "greedy": sum(greedy) / len(rows),
        "greedy_lenient": sum(greedy_lenient) / len(rows),
        "sampled": [],
    }
    print(
        f"{len(rows)} held-out problems: greedy strict accuracy {result['greedy']:.3f}, "
        f"lenient {result['greedy_lenient']:.3f}",
        flush=True,
    )
    for temperature in temperatures:
        hits: list[int] = []
        lenient_hits: list[int] = []
        per = max(1, batch // k)
        for i in range(0, len(rows), per):
            chunk = rows[i : i + per]
            out = generate(
                model,
                tokenizer,
                [r["prompt"] for r in chunk],
                num_generations=k,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                seeds=list(range(i, i + len(chunk))),
            )
            hits += [sum(right(t, r) for t in out.texts[j * k : (j + 1) * k]) for j, r in enumerate(chunk)]
            lenient_hits += [sum(lenient(t, r) for t in out.texts[j * k : (j + 1) * k]) for j, r in enumerate(chunk)]
        point = {
            "temperature": temperature,
            "k": k,
            "pass_at_k": sum(h > 0 for h in hits) / len(rows),
            "mean_at_k": sum(hits) / (k * len(rows)),
            "never_right": [r["id"] for r, h, g in zip(rows, hits, greedy, strict=True) if h == 0 and not g],
            "lenient_pass_at_k": sum(h > 0 for h in lenient_hits) / len(rows),
            "lenient_mean_at_k": sum(lenient_hits) / (k * len(rows)),
            "lenient_never_right": [
                r["id"] for r, h, g in zip(rows, lenient_hits, greedy_lenient, strict=True) if h == 0 and not g
            ],
        }
        result["sampled"].append(point)
        print(
            f"temperature {temperature}: pass@{k} {point['pass_at_k']:.3f}, mean@{k} {point['mean_at_k']:.3f}, "
            f"out of reach (no sample and not greedy) {len(point['never_right'])}; lenient pass@{k} "
            f"{point['lenient_pass_at_k']:.3f}, mean@{k} {point['lenient_mean_at_k']:.3f}, out of reach "
            f"{len(point['lenient_never_right'])}",
            flush=True,
        )
    unreachable = set.intersection(*(set(p["never_right"]) for p in result["sampled"])) if result["sampled"] else set()
    result["out_of_reach"] = sorted(unreachable)
    result["reachable_fraction"] = 1 - len(unreachable) / len(rows)
    print(
        f"out of reach at every temperature: {len(unreachable)} of {len(rows)}, so at most "
        f"{result['reachable_fraction']:.3f} strict accuracy from sharpening alone",
        flush=True,
    )
    unreachable = (
        set.intersection(*(set(p["lenient_never_right"]) for p in result["sampled"])) if result["sampled"] else set()
    )
    result["lenient_reachable_fraction"] = 1 - len(unreachable) / len(rows)
    print(f"lenient: at most {result['lenient_reachable_fraction']:.3f} from sharpening alone", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-S", "--set", action="append", default=[], help="task override, as in learning_run.py")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--out", type=Path, default=results_dir() / "ceiling.json", help="default: bench/results/<machine>/"
    )
    args = ap.parse_args()
    os.environ.update(QUIET)
    import torch

    torch.set_num_threads(2)
    root = prepare(Path(tempfile.mkdtemp(prefix="grpo-ceiling-")), args.set)
    result = measure(root, args.k, args.temperatures, args.max_new_tokens, args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": describe(2), "overrides": args.set, **result}, indent=2))


if __name__ == "__main__":
    main()
