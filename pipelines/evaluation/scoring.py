"""Score one model on the held-out problems: a greedy answer and k sampled answers per problem.

Each answer is judged by the task's judge, the one the policy's rewards were checked against. The
per-problem outcomes are kept, not only the averages, because the comparison between models is
paired problem by problem.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipelines.config import EvaluateConfig
from pipelines.verifiers.judge import judge_all
from pipelines.verifiers.math_answer import parse_number
from pipelines.verifiers.task import Task


def majority_answer(answers: list[str | None]) -> str | None:
    """The most frequent extracted answer (numbers compared by value); ties go to the earliest.

    >>> majority_answer(["7", None, "8", "7.0", "8"])
    '7'
    >>> majority_answer([None, None]) is None
    True
    """
    keys = [_vote_key(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    for answer, key in zip(answers, keys, strict=True):
        if key is not None and counts[key] == best:
            return answer
    return None


def _vote_key(answer: str | None) -> str | None:
    if answer is None:
        return None
    value = parse_number(answer)
    return repr(value) if value is not None else " ".join(answer.lower().split())


@dataclass(frozen=True)
class _Scoring:
    """What both passes share: the model to score, its rows, and how to sample and judge them."""

    model: Any
    tokenizer: Any
    rows: list[dict[str, Any]]
    cfg: EvaluateConfig
    label: str
    backend: str
    task: Task
    environment: Any

    def batches(self, size: int, desc: str) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """The rows in chunks of `size`, each with its start index, under a progress bar."""
        from tqdm.auto import tqdm  # disable=None: a bar on a terminal, none in logs and pipes

        for start in tqdm(range(0, len(self.rows), size), desc=f"eval {self.label} {desc}", unit="batch", disable=None):
            yield start, self.rows[start : start + size]

    def answer(
        self, chunk: list[dict[str, Any]], num_generations: int, **sampling: Any
    ) -> tuple[Any, list[dict[str, Any]]]:
        """`num_generations` answers to each row of `chunk`, and the task judge's verdict on each."""
        from pipelines.generation.rollout import generate

        rollout = generate(
            self.model,
            self.tokenizer,
            [r["prompt"] for r in chunk],
            num_generations=num_generations,
            max_new_tokens=self.cfg.max_new_tokens,
            bf16=self.cfg.bf16,
            backend=self.backend,
            environment=self.environment,
            **sampling,
        )
        # generate lays completions out group after group: each row once per completion
        group_rows = [r for r in chunk for _ in range(num_generations)]
        return rollout, judge_all(rollout.texts, group_rows, task=self.task, timeout=self.cfg.judge_timeout)


def answer_problems(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    cfg: EvaluateConfig,
    label: str,
    backend: str = "lean",
    task: Task | None = None,
) -> list[dict[str, Any]]:
    """One outcome per row: the greedy answer's verdict by the task's judge, and k sampled answers
    with pass/mean/maj@k."""
    from pipelines.generation.multi_turn import Environment

    if task is None:
        from pipelines.verifiers.math_task import TASK as task
    environment = Environment.of(task)  # a task with tools: every answer is an episode, pass@k included
    scoring = _Scoring(model, tokenizer, rows, cfg, label, backend, task, environment)
    outcomes = _greedy_outcomes(scoring)
    # Second: the sampled pass adds its k answers to the greedy pass's outcomes, one per row.
    _add_sampled_outcomes(outcomes, scoring)
    return outcomes


def _greedy_outcomes(scoring: _Scoring) -> list[dict[str, Any]]:
    """One outcome per row from a greedy answer, judged by the task's judge."""
    outcomes: list[dict[str, Any]] = []
    for _, chunk in scoring.batches(scoring.cfg.batch_size, "greedy"):
        rollout, verdicts = scoring.answer(chunk, 1, do_sample=False)
        for row, text, length, truncated, verdict in zip(
            chunk, rollout.texts, rollout.lengths.tolist(), rollout.truncated.tolist(), verdicts, strict=True
        ):
            outcomes.append(
                {
                    "model": scoring.label,
                    "id": row["id"],
                    "answer": row["answer"],
                    "completion": text,
                    "correct": verdict["correct"],
                    "format": verdict["format"],
                    "extracted": verdict["extracted"],
                    "lenient": verdict["lenient"],
                    "length": int(length),
                    "truncated": bool(truncated),
                }
            )
    return outcomes


def _add_sampled_outcomes(outcomes: list[dict[str, Any]], scoring: _Scoring) -> None:
    """Add k sampled answers and pass/mean/maj@k to each row's outcome, in place."""
    import torch

    cfg = scoring.cfg
    # The same seed for every model: each starts sampling from the same random state.
    torch.manual_seed(cfg.seed)
    per_call = max(1, cfg.batch_size // cfg.k)  # about batch_size sequences per generate call
    for start, chunk in scoring.batches(per_call, f"sampled k={cfg.k}"):
        rollout, verdicts = scoring.answer(
            chunk,
            cfg.k,
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            # A server samples from no shared random stream: seed each problem, the same for every model.
            seeds=[cfg.seed * 1_000_003 + start + i for i in range(len(chunk))] if scoring.backend == "vllm" else None,
        )
        samples = _samples(rollout.texts, rollout.lengths.tolist(), rollout.truncated.tolist(), verdicts)
        for i in range(len(chunk)):
            # generate lays completions out group after group
            _score_samples(outcomes[start + i], samples[i * cfg.k : (i + 1) * cfg.k])


def _samples(
    texts: list[str], lengths: list[int], truncated: list[bool], verdicts: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One record per sampled completion, in generate's order."""
    return [
        {
            "completion": text,
            "extracted": verdict["extracted"],
            "correct": verdict["correct"],
            "format": verdict["format"],
            "length": int(length),
            "truncated": bool(cut),
        }
        for text, length, cut, verdict in zip(texts, lengths, truncated, verdicts, strict=True)
    ]


def _score_samples(outcome: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """Set one problem's samples and its pass@k, mean@k and maj@k on its outcome."""
    majority = majority_answer([s["extracted"] for s in samples])
    outcome["samples"] = samples
    outcome["pass_at_k"] = any(s["correct"] for s in samples)
    outcome["mean_at_k"] = sum(s["correct"] for s in samples) / len(samples)
    outcome["majority_answer"] = majority
    # The judge's verdict on a sample that gave the majority answer: right by the task's rules.
    outcome["maj_at_k"] = majority is not None and any(
        s["correct"] for s in samples if s["extracted"] is not None and _vote_key(s["extracted"]) == _vote_key(majority)
    )


def summarize(outcomes: list[dict[str, Any]]) -> dict[str, float]:
    """Averages over problems. `accuracy` is greedy pass@1 by the task's strict verdict, and
    `lenient_accuracy` by its lenient reading.

    >>> sample = {"format": True, "length": 2, "truncated": False}
    >>> s = summarize([{"correct": True, "format": True, "lenient": True, "length": 4, "truncated": False,
    ...   "pass_at_k": True, "mean_at_k": 0.5, "maj_at_k": False, "samples": [sample] * 2}])
    >>> s["accuracy"], s["mean_at_k"], s["k"]
    (1.0, 0.5, 2.0)
    """
    n = max(len(outcomes), 1)
    summary = {
        "accuracy": sum(o["correct"] for o in outcomes) / n,
        "format_rate": sum(o["format"] for o in outcomes) / n,
        "lenient_accuracy": sum(o["lenient"] for o in outcomes) / n,
        "mean_length": sum(o["length"] for o in outcomes) / n,
        "truncation_rate": sum(o["truncated"] for o in outcomes) / n,
        "problems": float(len(outcomes)),
    }
    sampled = [s for o in outcomes for s in o.get("samples", [])]
    if sampled:
        m = len(sampled)
        summary.update(
            {
                "pass_at_k": sum(o["pass_at_k"] for o in outcomes) / n,
                "mean_at_k": sum(o["mean_at_k"] for o in outcomes) / n,
                "maj_at_k": sum(o["maj_at_k"] for o in outcomes) / n,
                "sample_format_rate": sum(s["format"] for s in sampled) / m,
                "sample_mean_length": sum(s["length"] for s in sampled) / m,
                "sample_truncation_rate": sum(s["truncated"] for s in sampled) / m,
                "k": float(len(outcomes[0]["samples"])),
            }
        )
    return summary
