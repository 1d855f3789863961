"""The `math` task: a numeric answer on a final `#### N` line (GSM8K's format, and the built-in arithmetic).

- judge: `correct` when the trailing `#### N` line holds the reference number (math_answer.py's
  rules: integers exactly, decimals forgiven only their rounding), `format` when there is such a
  line, and the lenient reading: the last number anywhere in the text is right (it tells a gain in
  skill from a gain in format);
- rewards: `accuracy` (the strict verdict, weight 1.0) and `format` (weight 0.2);
- a row's `answer` must be a number the verifier reads (GSM8K's `... #### N` is fine);
- offline data: `a op b` problems (data.generator: operators and operand ranges).
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator
from typing import Any

from pipelines.verifiers.judge import judge as judge_math
from pipelines.verifiers.math_answer import reference_answer
from pipelines.verifiers.rewards import accuracy_reward, format_reward
from pipelines.verifiers.task import Golden, Reward, Task, Verdict

# A number the math verifier reads (math_answer.parse_number): `1,234`, `-3.5`, `$5`, `3/4`;
# bounded so that every match stays within parse_number's 64 characters.
NUMERIC = re.compile(r"\s*-?\$?[0-9][0-9,]{0,23}(?:\.[0-9]{1,16})?(?:\s*/\s*[1-9][0-9]{0,15})?\s*")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_NAMES = {"+": "add", "-": "sub", "*": "mul"}


def judge(completion: str, row: dict[str, Any]) -> Verdict:
    """The strict, format and lenient readings of one completion (judge.py's math judge).

    >>> judge("2 + 2 = 4\\n#### 4", {"answer": "4"})
    Verdict(correct=True, format=True, lenient=True, extracted='4')
    """
    v = judge_math(completion, str(row["answer"]))
    return Verdict(v["correct"], v["format"], v["last_number_correct"], v["extracted"])


def check_row(row: dict[str, Any]) -> str | None:
    """Why a row's answer is not a number this verifier reads; None when it is.

    >>> check_row({"answer": "1,234"}) is None, check_row({"answer": "seven"})
    (True, "answer 'seven' is not a number the math verifier can read (GSM8K's `#### N` is fine)")
    """
    answer = str(row.get("answer", ""))
    if NUMERIC.fullmatch(answer):
        return None
    shown = answer if len(answer) <= 40 else answer[:40] + "..."
    return f"answer {shown!r} is not a number the math verifier can read (GSM8K's `#### N` is fine)"


def arithmetic(cfg: Any) -> Iterator[dict[str, Any]]:
    """Distinct `a op b` problems in a seeded random order, at most `cfg.num_rows` of them.

    Every problem appears once, so a split by id is also a split by problem (no leakage).

    >>> from pipelines.config import GeneratorConfig
    >>> rows = list(arithmetic(GeneratorConfig(operators=["+"], a_min=1, a_max=2, b_min=3, b_max=3, num_rows=5)))
    >>> sorted(r["prompt"] for r in rows)
    ['What is 1 + 3?', 'What is 2 + 3?']
    """
    space = [
        (a, op, b)
        for op in cfg.operators
        for a, b in itertools.product(range(cfg.a_min, cfg.a_max + 1), range(cfg.b_min, cfg.b_max + 1))
    ]
    random.Random(cfg.seed).shuffle(space)
    for a, op, b in space[: cfg.num_rows]:
        yield {"id": f"{_NAMES[op]}-{a}-{b}", "prompt": f"What is {a} {op} {b}?", "answer": str(_APPLY[op](a, b))}


TASK = Task(
    name="math",
    description="a number after a final `#### N` line (GSM8K, arithmetic)",
    instruction="{question} Give the final answer after ####.",
    # One worked example as an earlier chat turn: the embedded model then answers in the
    # required format (measured on the embedded SmolLM2: without it, it rambles to the length limit).
    examples=({"question": "What is 3 + 4?", "answer": "3 + 4 = 7\n#### 7"},),
    judge=judge,
    rewards=(Reward("accuracy", accuracy_reward, 1.0), Reward("format", format_reward, 0.2)),
    correctness="accuracy",
    columns=("answer",),
    check_row=check_row,
    answer_of=reference_answer,
    generate=arithmetic,
    lenient_name="last number right",
    golden=(
        Golden("2 + 2 = 4\n#### 4", {"answer": "4"}, correct=True, format=True, lenient=True,
               rewards={"accuracy": 1.0, "format": 1.0}),
        Golden("the answer is 4", {"answer": "4"}, correct=False, format=False, lenient=True,
               rewards={"accuracy": 0.0, "format": 0.0}),
        Golden("#### 5", {"answer": "4"}, correct=False, format=True, lenient=False,
               rewards={"accuracy": 0.0, "format": 1.0}),
        Golden("#### 1,000,000.0", {"answer": "1000000"}, correct=True, format=True, rewards={"accuracy": 1.0}),
        Golden("#### 1000001", {"answer": "1000000"}, correct=False, format=True, rewards={"accuracy": 0.0}),
        Golden("#### ٤", {"answer": "4"}, correct=False, format=False, rewards={"accuracy": 0.0}),
        # A marked answer that is not the final line, or not in the asked-for form, is not the answer.
        Golden("#### 4\nand then some more text", {"answer": "4"}, correct=False, format=False, lenient=True,
               rewards={"accuracy": 0.0}),
        Golden("so \\boxed{4}", {"answer": "4"}, correct=False, format=False, lenient=True, rewards={"accuracy": 0.0}),
        Golden("#### twelve", {"answer": "12"}, correct=False, format=False, rewards={"accuracy": 0.0, "format": 0.0}),
    ),
)  # fmt: skip
