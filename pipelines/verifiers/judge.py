"""Judging completions: the math task's judge, and `judge_all`, which judges a batch with any task's.

The math judge reads the same text three ways: `correct` (the strict `#### N` line holds the right
number), `format` (there is such a line) and `last_number_correct` (the last number anywhere is
right: the lenient reading, which tells a gain in skill from a gain in format). `judge_all` judges a
batch with a task's judge in the verifier worker process under a time limit
(`evaluate.judge_timeout`), as training's rewards are.
"""

from __future__ import annotations

from typing import Any

from pipelines.verifiers.math_answer import answers_match, last_number, strict_answer
from pipelines.verifiers.runner import run_limited
from pipelines.verifiers.task import Task


def judge(text: str, expected: str) -> dict[str, Any]:
    """The verdict on one completion.

    >>> judge("2 + 2 = 4\\n#### 4", "4")["correct"], judge("4", "4")["format"], judge("4", "4")["last_number_correct"]
    (True, False, True)
    """
    strict = strict_answer(text)
    return {
        "extracted": strict,
        "correct": answers_match(strict, expected),
        "format": strict is not None,
        "last_number_correct": answers_match(last_number(text), expected),
    }


def judge_all(
    texts: list[str],
    rows: list[dict[str, Any]],
    *,
    task: Task,
    timeout: float,
    knob: str = "evaluate.judge_timeout",
) -> list[dict[str, Any]]:
    """The task's verdict on each completion and its dataset row ({extracted, correct, format,
    lenient}), in the verifier worker process, stopped after `timeout` seconds with a VerifierError
    that names the limit's config key (`knob`).

    >>> from pipelines.verifiers.choice_task import TASK
    >>> [v["format"] for v in judge_all(["#### B", "#### 4"], [{"options": ["3", "4"], "answer": "B"}] * 2, task=TASK,
    ...                                 timeout=30)]
    [True, False]
    """
    if not texts:
        return []
    (verdicts,) = run_limited(
        [(f"judge of task {task.name}", task.judge_batch, {})], (list(texts), [dict(r) for r in rows]), {},
        timeout=timeout, what="verifier", knob=knob,
    )  # fmt: skip
    return verdicts
