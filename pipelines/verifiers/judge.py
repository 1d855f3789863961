"""The verdict on one completion against its reference answer, as evaluation and validation judge it.

Three readings of the same text: `correct` (the strict `#### N` line holds the right number),
`format` (there is such a line) and `last_number_correct` (the last number anywhere is right: the
lenient reading, which tells a gain in skill from a gain in format). `judge_all` judges a batch in
the verifier worker process under a time limit (`evaluate.judge_timeout`), as training's rewards are.
"""

from __future__ import annotations

from typing import Any

from pipelines.verifiers.math_answer import answers_match, last_number, strict_answer
from pipelines.verifiers.runner import run_limited


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


def judge_batch(texts: list[str], expected: list[str]) -> list[dict[str, Any]]:
    """`judge` on each completion and its reference answer.

    >>> [v["correct"] for v in judge_batch(["#### 4", "#### 5"], ["4", "4"])]
    [True, False]
    """
    return [judge(text, answer) for text, answer in zip(texts, expected, strict=True)]


def judge_all(
    texts: list[str], expected: list[str], *, timeout: float, knob: str = "evaluate.judge_timeout"
) -> list[dict[str, Any]]:
    """`judge_batch` in the verifier worker process, stopped after `timeout` seconds with a
    VerifierError that names the limit's config key (`knob`).

    >>> [v["format"] for v in judge_all(["#### 4", "4"], ["4", "4"], timeout=30)]
    [True, False]
    """
    if not texts:
        return []
    (verdicts,) = run_limited(
        [("judge", judge_batch, {})], (list(texts), [str(e) for e in expected]), {}, timeout=timeout, what="verifier",
        knob=knob,
    )  # fmt: skip
    return verdicts
