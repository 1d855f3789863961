"""Countdown: check that an arithmetic expression reaches a target with the given numbers.

Model output is untrusted text, so the expression is never evaluated by Python: a small tokenizer
and a recursive-descent parser accept only integers, + - * / and parentheses, and compute with
exact fractions. Length, nesting depth and the numbers themselves are bounded, so a check takes
microseconds whatever the model writes.

Numbers are ASCII digits only, as everywhere in the verifiers (math_answer.py): `٣ + ٤` (Arabic-Indic),
fullwidth or mathematical bold digits are refused, as are underscores (`1_0`), signs and exponents.
The target is compared exactly (fractions, never floats).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from pipelines.verifiers.math_answer import reference_answer

MAX_CHARS = 256
MAX_DEPTH = 32
_TOKEN = re.compile(r"\s*+(?:([0-9]++)|(.))")  # ASCII digits only: `\d` matches any script's digits
# Operators as models and people write them; everything else is refused.
_OPERATORS = {"+": "+", "-": "-", "−": "-", "*": "*", "×": "*", "x": "*", "/": "/", "÷": "/"}


class ExpressionError(ValueError):
    """An expression that is not a valid countdown answer; the message says why."""


@dataclass(frozen=True)
class Checked:
    value: Fraction
    numbers: tuple[int, ...]  # the literals used, in order


def tokenize(text: str) -> list[str | int]:
    """Integers and the characters `+ - * / ( )`; anything else is an error.

    >>> tokenize("(3 + 4) × 2")
    ['(', 3, '+', 4, ')', '*', 2]
    >>> tokenize("٣ + 4")
    Traceback (most recent call last):
    ...
    pipelines.verifiers.countdown.ExpressionError: unexpected character '٣'
    """
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"longer than {MAX_CHARS} characters")
    tokens: list[str | int] = []
    for match in _TOKEN.finditer(text.strip()):
        digits, symbol = match.groups()
        if digits is not None:
            if len(digits) > 1 and digits.startswith("0"):
                raise ExpressionError(f"number {digits} has a leading zero")
            tokens.append(int(digits))
        elif symbol in _OPERATORS:
            tokens.append(_OPERATORS[symbol])
        elif symbol in "()":
            tokens.append(symbol)
        elif not symbol.isspace():
            raise ExpressionError(f"unexpected character {symbol!r}")
    if not tokens:
        raise ExpressionError("empty expression")
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := INT | '(' expr ')'"""

    def __init__(self, tokens: list[str | int]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.used: list[int] = []

    def peek(self) -> str | int | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | int | None:
        token = self.peek()
        self.pos += 1
        return token

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term(depth)
            value = value + right if op == "+" else value - right
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.factor(depth)
            if op == "*":
                value = value * right
            elif right == 0:
                raise ExpressionError("division by zero")
            else:
                value = value / right
        return value

    def factor(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
        token = self.take()
        if isinstance(token, int):
            self.used.append(token)
            return Fraction(token)
        if token == "(":
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("unbalanced parentheses")
            return value
        if token is None:
            raise ExpressionError("expression ends early")
        # Unary minus is refused on purpose: countdown combines the given numbers, it does not negate them.
        raise ExpressionError(f"unexpected {token!r}")


def check_expression(text: str, numbers: Iterable[int]) -> Checked:
    """Parse `text` and compute it exactly, using each of `numbers` at most once.

    >>> check_expression("(25 - 4) * 3", [3, 4, 25]).value
    Fraction(63, 1)
    >>> check_expression("3 * 3", [3, 4])
    Traceback (most recent call last):
    ...
    pipelines.verifiers.countdown.ExpressionError: uses 3 more often than given (given: 3, 4)
    """
    checked = parse(text)
    given = list(numbers)
    extra = Counter(checked.numbers) - Counter(given)
    if extra:
        shown = ", ".join(str(n) for n in given)
        raise ExpressionError(f"uses {min(extra)} more often than given (given: {shown})")
    return checked


def parse(text: str) -> Checked:
    """Parse `text` and compute it exactly (no rule about which numbers it uses).

    >>> parse("12 * (3 + 4)").value
    Fraction(84, 1)
    """
    tokens = tokenize(text)
    parser = _Parser(tokens)
    value = parser.expr(0)
    if parser.pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[parser.pos]!r} after a complete expression")
    return Checked(value=value, numbers=tuple(parser.used))


def expression_part(answer: str) -> str:
    """The expression of a final answer written as `expr` or `expr = target`.

    >>> expression_part("(3 + 4) * 2 = 14")
    '(3 + 4) * 2'
    """
    return answer.split("=", 1)[0].strip().rstrip(".").strip()


def solves(answer: str | None, numbers: Iterable[int], target: int | Fraction) -> bool:
    """True when `answer` (an expression, optionally `= target`) equals `target` with the numbers.

    >>> solves("50 + 25 - 7 - 3", [3, 7, 25, 50], 65), solves("50 + 15", [3, 7, 25, 50], 65)
    (True, False)
    """
    if not answer:
        return False
    try:
        return check_expression(expression_part(answer), numbers).value == Fraction(target)
    except ExpressionError:
        return False


def countdown_target(answer: object) -> int | None:
    """The integer target in a row's `answer` (a bare number or after `####`); None otherwise.

    >>> countdown_target("65"), countdown_target("#### 65"), countdown_target("six"), countdown_target("６５")
    (65, 65, None, None)
    """
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, int):
        return answer
    text = reference_answer(str(answer)).strip()
    return int(text) if re.fullmatch(r"-?[0-9]{1,18}", text) else None


def problem_issue(numbers: object, answer: object, solution: object = None) -> str | None:
    """Why a dataset row is not a countdown problem this verifier can check; None when it is.

    >>> problem_issue([3, 7], "10", "3 + 7") is None, problem_issue([3, 7], "10", "3 * 7")
    (True, 'solution 3 * 7 gives 21, not the target 10')
    """
    if not isinstance(numbers, list) or not numbers:
        return "`numbers` must be a non-empty list of integers"
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 10**9 for n in numbers):
        return "`numbers` must hold non-negative integers below 10**9"
    target = countdown_target(answer)
    if target is None:
        return "`answer` must be the integer target"
    if solution is None:
        return None
    try:
        value = check_expression(expression_part(str(solution)), numbers).value
    except ExpressionError as exc:
        return f"solution {solution} is not valid: {exc}"
    return None if value == target else f"solution {solution} gives {value}, not the target {target}"
