"""The verdict on one completion against its reference answer, as evaluation and validation judge it.

Three readings of the same text: `correct` (the strict `#### N` line holds the right number),
`format` (there is such a line) and `last_number_correct` (the last number anywhere is right: the
lenient reading, which tells a gain in skill from a gain in format).
"""

from __future__ import annotations

from typing import Any

from pipelines.verifiers.math_answer import answers_match, last_number, strict_answer


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
