"""What a multi-turn step costs against a single-turn step that generates as many model tokens.

The calculator task's prompts on the pinned reference: one batch of episodes (the tool called, its
reply appended, the next turn), then the same prompts sampled in one turn with every completion forced
to the episodes' mean number of model tokens (`min_new_tokens`), once with each completion forced to
its episode's own number of model tokens (the same tokens, row for row, so the same unevenness), and
once more with each completion ending at its own EOS (compared per model token). Each is timed for sampling and for
the training pass (log-probs, loss, backward) on the merged sampling copy and the LoRA policy, as the
trainer runs them; rounds alternate the two, and the median counts.

    .venv/bin/python bench/multi_turn_cost.py --reference models/reference --rounds 3

prints a table and writes bench/results/<machine>/multi-turn-cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import describe, results_dir  # noqa: E402


def _models(reference: Path):
    import torch

    from pipelines.config import LoraConfig
    from pipelines.generation.sampling_copy import SamplingCopy
    from pipelines.grpo.policy import add_lora
    from pipelines.precision import native_bf16
    from pipelines.snapshot.loading import load_reference

    base, tokenizer = load_reference(reference)
    policy = add_lora(base, LoraConfig(r=16, alpha=32))
    sampler = SamplingCopy(policy, torch.bfloat16 if native_bf16() else torch.float32)
    return policy, sampler.model, tokenizer, native_bf16()


def _prompts(n: int, seed: int) -> list:
    import random

    from pipelines.config import PromptConfig
    from pipelines.data.prompts import build_messages, task_prompt
    from pipelines.verifiers.calculator_task import TASK

    rng = random.Random(seed)
    template = task_prompt(PromptConfig(), TASK)
    return [build_messages(f"What is {rng.randint(10, 999)} * {rng.randint(10, 999)}?", template) for _ in range(n)]


@contextmanager
def _forced_lengths(lengths: list[int], eos_id: int):
    """Single-turn rows of exactly `lengths` tokens (EOS last), row for row, by steering the sampler's
    noise: EOS cannot win before a row's length and only EOS can win at it. A bench-only patch of
    lean_decode's exponential race (`token = argmax(p / noise)`), so the decoding loop itself, its
    batch shrinking as rows end included, runs as in training."""
    import torch

    from pipelines.generation import lean_decode

    original, want, step = lean_decode._exponential_noise, torch.tensor(lengths), [0]

    def steered(probs, active, generators):
        noise = original(probs, active, generators)
        last = want[active.cpu()] - 1 <= step[0]
        noise[~last, eos_id] = float("inf")  # p / inf = 0: EOS loses
        noise[last] = float("inf")
        noise[last, eos_id] = 1e-30  # EOS wins
        step[0] += 1
        return noise

    lean_decode._exponential_noise = steered
    try:
        yield
    finally:
        lean_decode._exponential_noise = original


def _timed(policy, sampler, tokenizer, prompts, train_bf16: bool, **sampling) -> dict:
    import torch

    from pipelines.generation.rollout import generate
    from pipelines.grpo.logprobs import token_logps
    from pipelines.grpo.loss import grpo_loss

    started = time.perf_counter()
    rollout = generate(sampler, tokenizer, prompts, do_sample=True, seeds=list(range(len(prompts))), **sampling)
    sampled = time.perf_counter()
    policy.train()
    logp, entropy = token_logps(policy, rollout, train_bf16, with_entropy=True)
    advantages = torch.linspace(-1, 1, rollout.rows)
    loss, _ = grpo_loss(logp, logp.detach(), advantages, rollout.trained_mask.float(), entropy=entropy)
    loss.backward()
    policy.zero_grad(set_to_none=True)
    trained = time.perf_counter()
    return {
        "sample_s": sampled - started,
        "train_s": trained - sampled,
        "model_tokens": int(rollout.trained_mask.sum()),
        "all_tokens": int(rollout.completion_mask.sum()),
        "rows": rollout.rows,
        "row_model_tokens": rollout.trained_mask.sum(-1).tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, default=REPO / "models" / "reference")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch

    from pipelines.generation.multi_turn import Environment
    from pipelines.verifiers.calculator_task import TASK

    torch.manual_seed(0)
    policy, sampler, tokenizer, bf16 = _models(args.reference)
    prompts = _prompts(args.prompts, 0)
    common = {"num_generations": args.generations, "bf16": False}
    # "single-turn" is forced to the episodes' mean length in every row (the strictest baseline: no row
    # waits for a longer one); "single-turn, own lengths" lets each completion end at its EOS, as a
    # real single-turn step does, and is compared per model token.
    runs: dict[str, list[dict]] = {
        "multi-turn": [], "single-turn": [], "single-turn, episodes' lengths": [], "single-turn, own lengths": []
    }  # fmt: skip
    for _ in range(args.rounds):
        episodes = _timed(
            policy, sampler, tokenizer, prompts, bf16, max_new_tokens=args.max_tokens,
            environment=Environment.of(TASK), **common,
        )  # fmt: skip
        runs["multi-turn"].append(episodes)
        per_row = max(1, round(episodes["model_tokens"] / episodes["rows"]))  # the same model tokens, forced
        runs["single-turn"].append(
            _timed(policy, sampler, tokenizer, prompts, bf16, max_new_tokens=per_row, min_new_tokens=per_row, **common)
        )
        with _forced_lengths(episodes["row_model_tokens"], tokenizer.eos_token_id):
            runs["single-turn, episodes' lengths"].append(
                _timed(policy, sampler, tokenizer, prompts, bf16, max_new_tokens=args.max_tokens, **common)
            )
        runs["single-turn, own lengths"].append(
            _timed(policy, sampler, tokenizer, prompts, bf16, max_new_tokens=args.max_tokens, **common)
        )
    summary = {
        kind: {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "row_model_tokens"}
        for kind, rounds in runs.items()
    }
    for part in summary.values():
        part["step_s"] = part["sample_s"] + part["train_s"]
        part["ms_per_model_token"] = 1000 * part["step_s"] / part["model_tokens"]
    ratio = summary["multi-turn"]["step_s"] / summary["single-turn"]["step_s"]
    row_for_row = summary["multi-turn"]["step_s"] / summary["single-turn, episodes' lengths"]["step_s"]
    per_token = summary["multi-turn"]["ms_per_model_token"] / summary["single-turn, own lengths"]["ms_per_model_token"]
    print(f"machine: {describe()}")
    print("| | sampling s | training pass s | step s | model tokens | all tokens | ms per model token |")
    print("|---|---|---|---|---|---|---|")
    for kind, part in summary.items():
        print(
            f"| {kind} | {part['sample_s']:.2f} | {part['train_s']:.2f} | {part['step_s']:.2f} | "
            f"{part['model_tokens']:.0f} | {part['all_tokens']:.0f} | {part['ms_per_model_token']:.1f} |"
        )
    print(f"multi-turn / single-turn step time, as many model tokens: {ratio:.2f} (target <= 1.3)")
    print(f"multi-turn / single-turn of the episodes' lengths, row for row: {row_for_row:.2f} (target <= 1.3)")
    print(f"multi-turn / single-turn with its own lengths, per model token: {per_token:.2f}")
    out = results_dir() / "multi-turn-cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": describe(), "args": vars(args) | {"reference": str(args.reference)},
                               "runs": runs, "summary": summary, "ratio": ratio, "ratio_row_for_row": row_for_row,
                               "ratio_per_token_own_lengths": per_token}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
