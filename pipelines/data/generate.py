"""Built-in, seeded task generators: verifiable problems without any download."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

from pipelines.config import GeneratorConfig
from pipelines.verifiers.countdown import problem_issue

_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_NAMES = {"+": "add", "-": "sub", "*": "mul"}


def arithmetic(cfg: GeneratorConfig) -> Iterator[dict[str, Any]]:
    """Distinct `a op b` problems in a seeded random order, at most `cfg.num_rows` of them.

    Every problem appears once, so a split by id is also a split by problem (no leakage).

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
        yield {
            "id": f"{_NAMES[op]}-{a}-{b}",
            "prompt": f"What is {a} {op} {b}?",
            "answer": str(_APPLY[op](a, b)),
        }


def countdown(cfg: GeneratorConfig) -> Iterator[dict[str, Any]]:
    """Distinct countdown problems: reach a target with the given numbers, + - * / and parentheses.

    Each target is built from a random expression over all the numbers, whose every step stays a
    positive integer, so every problem has a solution; the solution is kept in the `solution`
    column (checked by the same parser as the reward) and never shown in the prompt.

    >>> row = next(countdown(GeneratorConfig(task="countdown", num_rows=1)))
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
            "prompt": (
                f"Using the numbers {', '.join(str(n) for n in numbers)}, write an expression that equals {target}. "
                "Use + - * / and parentheses, each number at most once; the final answer is the expression."
            ),
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


GENERATORS = {"arithmetic": arithmetic, "countdown": countdown}


def generate(cfg: GeneratorConfig) -> Iterator[dict[str, Any]]:
    """Rows of the task named by `cfg.task`."""
    return GENERATORS[cfg.task](cfg)
