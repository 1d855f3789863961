"""The `countdown` task: reach a target with the given numbers, + - * / and parentheses, each number once.

- judge: `correct` when the final answer (after `####`, in `\\boxed{}` or `<answer>`) is an
  expression that equals the target using each of the row's `numbers` at most once (parsed by
  countdown.py, never evaluated by Python); `format` when that answer is an expression with at
  least one operator. Restating the target (`#### 65`) is neither. No lenient reading;
- rewards: `countdown` (the strict verdict, weight 1.0) and `countdown_format` (weight 0.2);
- a row needs `numbers` (a list of integers) and an integer target as `answer`, and a `solution`
  column, when there is one, must reach it;
- offline data: problems built from random solvable expressions (data.generator.countdown).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

from pipelines.verifiers.countdown import ExpressionError, countdown_target, expression_part, problem_issue, tokenize
from pipelines.verifiers.math_answer import extract_final_answer, reference_answer
from pipelines.verifiers.rewards import _text, countdown_reward
from pipelines.verifiers.task import Golden, Reward, Task, Verdict


def is_expression(answer: str | None) -> bool:
    """An answer in the required form: integers, + - * / and parentheses, with at least one operator.

    >>> is_expression("50 + 15"), is_expression("65"), is_expression("import os")
    (True, False, False)
    """
    if not answer:
        return False
    try:
        tokens = tokenize(expression_part(answer))
    except ExpressionError:
        return False
    return any(t in ("+", "-", "*", "/") for t in tokens)


def judge(completion: str, row: dict[str, Any]) -> Verdict:
    """The countdown verdict on one completion: the same reading as `countdown_reward`.

    >>> row = {"numbers": [3, 7, 25, 50], "answer": "65"}
    >>> judge("#### 50 + 25 - 7 - 3", row).correct, judge("#### 65", row)
    (True, Verdict(correct=False, format=False, lenient=None, extracted='65'))
    """
    extracted = extract_final_answer(_text(completion))
    (score,) = countdown_reward(["q"], [completion], numbers=[row.get("numbers")], answer=[str(row.get("answer", ""))])
    return Verdict(correct=score == 1.0, format=is_expression(extracted), extracted=extracted)


def countdown_format_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float | None]:
    """1.0 when the final answer is an arithmetic expression (the judge's `format`), else 0.0.

    >>> countdown_format_reward(["q"] * 2, ["#### 3 * (4 + 5)", "#### 27"])
    [1.0, 0.0]
    """
    return [1.0 if is_expression(extract_final_answer(_text(c))) else 0.0 for c in completions]


def check_row(row: dict[str, Any]) -> str | None:
    """Why a row is not a countdown problem this verifier can check; None when it is."""
    return problem_issue(row.get("numbers"), row.get("answer"), row.get("solution"))


def question(numbers: list[int], target: int) -> str:
    return (
        f"Using the numbers {', '.join(str(n) for n in numbers)}, write an expression that equals {target}. "
        "Use + - * / and parentheses, each number at most once; the final answer is the expression."
    )


def generate(cfg: Any) -> Iterator[dict[str, Any]]:
    """Distinct countdown problems: reach a target with the given numbers, + - * / and parentheses.

    Each target is built from a random expression over all the numbers, whose every step stays a
    positive integer, so every problem has a solution; the solution is kept in the `solution`
    column (checked by the same parser as the reward) and never shown in the prompt.

    >>> from pipelines.config import GeneratorConfig
    >>> row = next(generate(GeneratorConfig(num_rows=1)))
    >>> sorted(row)
    ['answer', 'id', 'numbers', 'prompt', 'solution']
    >>> row["answer"] in row["prompt"] and row["solution"] not in row["prompt"]
    True
    """
    c = cfg.countdown
    rng = random.Random(cfg.seed)
    seen: set[tuple[tuple[int, ...], int]] = set()
    # A small number space may hold fewer than num_rows problems: stop after a bounded search
    # (the minimum-rows expectations then say so) instead of looping forever.
    for _ in range(cfg.num_rows * 50):
        if len(seen) >= cfg.num_rows:
            return
        numbers = [rng.randint(c.min_number, max(c.min_number, c.max_number)) for _ in range(c.count)]
        built = _random_solution(numbers, rng)
        if built is None:
            continue
        target, solution = built
        key = (tuple(sorted(numbers)), target)
        # A target that is one of the numbers is solved by copying it: not a multi-step problem.
        if not 1 <= target <= c.max_target or target in numbers or key in seen:
            continue
        seen.add(key)
        row = {
            "id": f"countdown-{'-'.join(str(n) for n in numbers)}-{target}",
            "prompt": question(numbers, target),
            "answer": str(target),
            "numbers": numbers,
            "solution": solution,
        }
        assert problem_issue(numbers, row["answer"], solution) is None, row  # the generator's own invariant
        yield row


def _random_solution(numbers: list[int], rng: random.Random) -> tuple[int, str] | None:
    """Combine random pairs with random operators until one value is left; None when a step
    would leave the positive integers (countdown's rule for intermediate results)."""
    items: list[tuple[Fraction, str]] = [(Fraction(n), str(n)) for n in numbers]
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (a, ea), (b, eb) = items[i], items[j]
        op = rng.choice("+-*/")
        if op == "-" and a < b:
            (a, ea), (b, eb) = (b, eb), (a, ea)
        if op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        elif op == "*":
            value = a * b
        else:
            value = a / b
        if value <= 0 or value.denominator != 1:
            return None
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [(value, f"({ea} {op} {eb})")]
    value, expression = items[0]
    return int(value), expression[1:-1] if expression.startswith("(") else expression


def _answer_of(answer: str) -> str:
    target = countdown_target(answer)
    return str(target) if target is not None else reference_answer(answer)


_ROW = {"numbers": [3, 7, 25, 50], "answer": "65"}

TASK = Task(
    name="countdown",
    description="an expression of the given numbers that reaches the target",
    instruction="{question} Give the final expression after ####.",
    examples=({"question": question([2, 5, 9], 19), "answer": "2 * 5 = 10, 10 + 9 = 19\n#### 2 * 5 + 9"},),
    judge=judge,
    rewards=(Reward("countdown", countdown_reward, 1.0), Reward("countdown_format", countdown_format_reward, 0.2)),
    correctness="countdown",
    lenient_name="none (the strict verdict)",
    columns=("answer", "numbers"),
    check_row=check_row,
    answer_of=_answer_of,
    generate=generate,
    golden=(
        Golden("50 + 25 = 75, 75 - 7 - 3 = 65\n#### 50 + 25 - 7 - 3", _ROW, correct=True, format=True,
               rewards={"countdown": 1.0, "countdown_format": 1.0}),
        Golden("#### (50 + 25) - (7 + 3) = 65", _ROW, correct=True, format=True, rewards={"countdown": 1.0}),
        Golden("#### 50 + 15", _ROW, correct=False, format=True, rewards={"countdown": 0.0, "countdown_format": 1.0}),
        # Restating the target is not a solution, nor an expression.
        Golden("#### 65", _ROW, correct=False, format=False, rewards={"countdown": 0.0, "countdown_format": 0.0}),
        Golden("#### 50 + 50 - 25 - 10", _ROW, correct=False, format=True, rewards={"countdown": 0.0}),
        Golden("#### __import__('os')", _ROW, correct=False, format=False, rewards={"countdown": 0.0}),
        Golden("\\boxed{(25 - 7 - 3) + 50}", _ROW, correct=True, format=True, rewards={"countdown": 1.0}),
        Golden("#### 3 * 25 - 7 - 3", _ROW, correct=False, format=True, rewards={"countdown": 0.0}),  # 3 used twice
    ),
)  # fmt: skip
