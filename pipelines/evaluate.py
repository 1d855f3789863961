"""Stage 4, evaluate: verifier-scored greedy answers of the reference and the policy on held-out data.

Both models answer the same problems with the same decoding, so the comparison is paired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.config import Config
from pipelines.grpo.rollout import generate
from pipelines.io import read_jsonl, write_json, write_jsonl, write_text
from pipelines.models import load_reference, set_threads
from pipelines.paths import Paths
from pipelines.snapshot import verify
from pipelines.verifiers.math_answer import answers_match, last_number, strict_answer


@dataclass
class EvalResult:
    reference: dict[str, float]
    policy: dict[str, float]


def answer_problems(model: Any, tokenizer: Any, rows: list[dict[str, Any]], cfg: Config, label: str) -> list[dict[str, Any]]:
    """Greedy answers to every row, each judged by the verifiers."""
    from tqdm.auto import tqdm

    e = cfg.evaluate
    outcomes = []
    for start in tqdm(range(0, len(rows), e.batch_size), desc=f"eval {label}", unit="batch"):
        chunk = rows[start : start + e.batch_size]
        rollout = generate(
            model, tokenizer, [r["prompt"] for r in chunk], num_generations=1,
            max_new_tokens=e.max_new_tokens, do_sample=False, bf16=e.bf16,
        )
        for row, text, length, truncated in zip(chunk, rollout.texts, rollout.lengths.tolist(), rollout.truncated.tolist(), strict=True):
            strict = strict_answer(text)
            outcomes.append(
                {
                    "model": label,
                    "id": row["id"],
                    "answer": row["answer"],
                    "completion": text,
                    "correct": answers_match(strict, row["answer"]),
                    "format": strict is not None,
                    "last_number_correct": answers_match(last_number(text), row["answer"]),
                    "length": int(length),
                    "truncated": bool(truncated),
                }
            )
    return outcomes


def summarize(outcomes: list[dict[str, Any]]) -> dict[str, float]:
    n = max(len(outcomes), 1)
    return {
        "accuracy": sum(o["correct"] for o in outcomes) / n,
        "format_rate": sum(o["format"] for o in outcomes) / n,
        "last_number_accuracy": sum(o["last_number_correct"] for o in outcomes) / n,
        "mean_length": sum(o["length"] for o in outcomes) / n,
        "truncation_rate": sum(o["truncated"] for o in outcomes) / n,
        "problems": float(len(outcomes)),
    }


def report(result: EvalResult) -> str:
    rows = [
        ("accuracy (strict `#### N`)", "accuracy"),
        ("last number correct", "last_number_accuracy"),
        ("format rate", "format_rate"),
        ("mean completion tokens", "mean_length"),
        ("truncation rate", "truncation_rate"),
    ]
    lines = [
        "# Evaluation on the held-out split",
        "",
        f"Greedy decoding, {int(result.policy['problems'])} problems, both models on the same problems.",
        "",
        "| metric | reference | policy | change |",
        "|---|---:|---:|---:|",
    ]
    for title, key in rows:
        ref, pol = result.reference[key], result.policy[key]
        lines.append(f"| {title} | {ref:.3f} | {pol:.3f} | {pol - ref:+.3f} |")
    return "\n".join(lines) + "\n"


def run(cfg: Config, paths: Paths) -> EvalResult:
    from peft import PeftModel

    set_threads(cfg.runtime.num_threads)
    verify(paths.reference_dir)
    rows = read_jsonl(paths.eval_split)
    base, tokenizer = load_reference(paths.reference_dir, cfg.snapshot.trust_remote_code)
    reference = answer_problems(base, tokenizer, rows, cfg, "reference")
    policy_model = PeftModel.from_pretrained(base, paths.policy_dir)
    policy_model.eval()
    policy = answer_problems(policy_model, tokenizer, rows, cfg, "policy")
    result = EvalResult(reference=summarize(reference), policy=summarize(policy))
    write_jsonl(paths.eval_samples, reference + policy)
    write_json(
        paths.eval_metrics,
        {"reference": result.reference, "policy": result.policy, "gain": result.policy["accuracy"] - result.reference["accuracy"]},
    )
    write_text(paths.eval_report, report(result))
    return result
