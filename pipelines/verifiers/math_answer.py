"""Extract and compare final answers in model output.

Model output is untrusted text: it is parsed with regular expressions and a brace counter,
never evaluated (no eval/exec, no sympy parsing). Every reading takes time linear in the text:

- Only the last `TAIL_CHARS` characters are read, after trailing whitespace is stripped (`rstrip`,
  linear): a final answer sits at the end, and a completion of a million spaces or unclosed tags
  costs no more than one of 16 KiB.
- No pattern can backtrack over a run of text: whitespace and digit runs are matched possessively
  (`*+`, Python 3.11), a match may start only at a digit, a sign or `$` (never inside a whitespace
  run), and `\\boxed{...}` and `<answer>...</answer>` are found in one left-to-right pass.

What counts as a number (the same for every verifier, countdown included):

- ASCII digits only. Arabic-Indic (`٤٢`), fullwidth (`４２`) and mathematical bold (`𝟒𝟐`) digits are
  text, not numbers, although `float()` and `str.isdigit` accept them.
- No underscores (`float("4_2")` is 42; here `4_2` is text), no `nan` or `inf`; `1,234`, `$5`, `-3.5`,
  `.5`, `7.`, `1e3` (exponents of at most 3 digits) and `3/4` are numbers.

When two numbers match (`answers_match`):

- Integers compare exactly, and so does every pair whose values are both integers: `42`, `42.0` and
  `84/2` match; `123456800` does not match `123456789`, nor `1000001` `1000000`.
- Otherwise (a side has a fractional part) they match when equal as exact rationals (`0.5` and `1/2`),
  or when a side written as a decimal differs only by rounding: by at most half a unit in its last
  written place and at most `rel_tol` (1e-6) relative. So `0.3333333` matches `1/3` but `0.33` does not,
  and `1000000.5` never matches `1000000`.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import NamedTuple

TAIL_CHARS = 16_384  # characters read from the end of a completion, after trailing whitespace

# `findall` semantics as before; possessive, since the line after the marker always matches.
_HASHES = re.compile(r"####\s*+([^\n]*+)")
_BOXED_OR_BRACE = re.compile(r"\\boxed\{|[{}]")
_OPEN_TAG = re.compile("<answer>", re.IGNORECASE)
_CLOSE_TAG = re.compile("</answer>", re.IGNORECASE)
# A number starts at a digit, a sign, `$` or `.` (never inside a whitespace run, which made the old
# `-?\$?\s*\d` quadratic); its spaces and digit runs are possessive.
_NUMBER = re.compile(r"(?:(?:-\$?|\$)\s*+)?[0-9][0-9,]*+(?:\.[0-9]++)?(?:\s*+/\s*+[0-9]++)?|-?\.[0-9]++")
_STRICT_NUMBER = re.compile(r"[0-9][0-9,]*+(?:\.[0-9]++)?")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]++(?:\.[0-9]*+)?|\.[0-9]++)(?:[eE][+-]?[0-9]{1,3})?")
_FRACTION = re.compile(r"([+-]?[0-9]++)\s*+/\s*+([+-]?[0-9]++)")
_NUMBER_CHARS = "0123456789,."


def tail(text: str) -> str:
    """The part of a completion the verifiers read: at most `TAIL_CHARS` characters from its end,
    after trailing whitespace.

    >>> tail("#### 7" + " " * 10_000)
    '#### 7'
    """
    text = text.rstrip()
    return text[-TAIL_CHARS:] if len(text) > TAIL_CHARS else text


def boxed_contents(text: str) -> list[str]:
    r"""Contents of every `\boxed{...}`, matching nested braces (one pass, linear in the text).

    A `\boxed{}` inside another closed one is part of its content, not a separate answer; one
    inside an unclosed `\boxed{` counts.

    >>> boxed_contents(r"so \boxed{\frac{1}{2}} and \boxed{3}")
    ['\\frac{1}{2}', '3']
    >>> boxed_contents(r"\boxed{ \boxed{4}")
    ['4']
    """
    first = text.find("\\boxed{")
    if first == -1:
        return []
    closed: list[tuple[int, int]] = []  # (content start, closing brace) of every closed \boxed{
    stack: list[int] = []  # per open brace: where its content starts if it opened a \boxed{, else -1
    for match in _BOXED_OR_BRACE.finditer(text, first):
        token = match.group()
        if token == "}":
            if stack and (start := stack.pop()) >= 0:
                closed.append((start, match.start()))
        else:
            stack.append(match.end() if token != "{" else -1)
    found, end = [], -1
    for start, stop in sorted(closed):  # closed boxes nest properly: keep the outermost ones
        if start > end:
            found.append(text[start:stop])
            end = stop
    return found


def last_answer_tag(text: str) -> str | None:
    """Content of the last `<answer>...</answer>` (case-insensitive), each tag closed by the first
    `</answer>` after it; None without one.

    >>> last_answer_tag("<answer>5</answer> <ANSWER> 6 </Answer> <answer>7")
    ' 6 '
    """
    last, pos = None, 0
    while (opening := _OPEN_TAG.search(text, pos)) is not None:
        closing = _CLOSE_TAG.search(text, opening.end())
        if closing is None:  # no later tag can be closed either
            break
        last, pos = text[opening.end() : closing.start()], closing.end()
    return last


def extract_final_answer(text: str) -> str | None:
    """The final answer marked by `#### N`, `\\boxed{N}` or `<answer>N</answer>` (the last one wins),
    read from the completion's tail.

    >>> extract_final_answer("3 + 4 = 7\\n#### 7")
    '7'
    >>> extract_final_answer("no marker, just 12") is None
    True
    """
    text = tail(text)
    hashes = _HASHES.findall(text) if "####" in text else []
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    tag = last_answer_tag(text)
    return tag.strip() if tag is not None else None


def strict_answer(text: str) -> str | None:
    """The number in a trailing `#### N` line (optionally `-`, `$`, a final `.`), the format the
    prompts ask for; else None. Read from the right, so its time is linear in the text.

    >>> strict_answer("so 3 * 4 = 12\\n#### $ 12."), strict_answer("#### 12 and more") is None
    ('$ 12', True)
    """
    s = tail(text)
    if s.endswith("."):
        s = s[:-1].rstrip()
    # The number is the whole run of digits, commas and dots at the end: it must follow `####`, a
    # space, `$` or `-`, none of which can be inside the run.
    start = len(s.rstrip(_NUMBER_CHARS))
    if _STRICT_NUMBER.fullmatch(s, start) is None:
        return None
    head = s[:start].rstrip()
    group = start
    if head.endswith("$"):
        head, group = head[:-1], len(head) - 1
    if head.endswith("-"):
        head, group = head[:-1], len(head) - 1
    return s[group:] if head.rstrip().endswith("####") else None


def last_number(text: str) -> str | None:
    """The last number anywhere in the completion's tail (a lenient reading of what the model meant).

    >>> last_number("I get 3, then 45.5 total"), last_number("digits ٤٢ are not ASCII") is None
    ('45.5', True)
    """
    numbers = _NUMBER.findall(tail(text))
    return numbers[-1].strip() if numbers else None


class Number(NamedTuple):
    """A parsed number: its exact value, and its written decimal places (None when it is exact:
    an integer or a fraction written without a decimal point)."""

    value: Fraction
    places: int | None


def read_number(text: str) -> Number | None:
    """The number written in `text` (rules in the module docstring); None when it is not one.

    >>> read_number("$1,234.50")
    Number(value=Fraction(2469, 2), places=2)
    >>> read_number("4_2") is None, read_number("٤٢") is None, read_number("1/0") is None
    (True, True, True)
    """
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    cleaned = cleaned.removeprefix("\\$")
    if not cleaned or len(cleaned) > 64:
        return None
    cleaned = cleaned.strip()  # float() and int() allowed whitespace around the number and the `/`
    if (fraction := _FRACTION.fullmatch(cleaned)) is not None:
        num, den = int(fraction[1]), int(fraction[2])
        if den == 0:
            return None
        number = Number(Fraction(num, den), None)
    elif cleaned.isdigit() and cleaned.isascii():  # the common case: a plain integer
        number = Number(Fraction(int(cleaned)), None)
    elif _DECIMAL.fullmatch(cleaned) is not None:
        mantissa, _, exponent = cleaned.lower().partition("e")
        places = len(mantissa.partition(".")[2]) - int(exponent or 0) if "." in mantissa or exponent else None
        number = Number(Fraction(cleaned), places)
    else:
        return None
    try:
        float(number.value)  # numbers beyond float's range (inf) are refused, as float() refused them
    except OverflowError:
        return None
    return number


def parse_number(text: str) -> float | None:
    """A number written as `1,234`, `$5`, `-3.5`, `7.` or `3/4`; None when it is not one.

    >>> parse_number("$1,234.50")
    1234.5
    >>> parse_number("3/4")
    0.75
    >>> parse_number("seven") is None, parse_number("4_2") is None, parse_number("４２") is None
    (True, True, True)
    """
    number = read_number(text)
    return float(number.value) if number is not None else None


def numbers_match(a: Number, b: Number, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Whether two numbers are the same answer (rules in the module docstring).

    >>> n = read_number
    >>> numbers_match(n("42.0"), n("42")), numbers_match(n("1000001"), n("1000000"))
    (True, False)
    >>> numbers_match(n("0.3333333"), n("1/3")), numbers_match(n("0.33"), n("1/3"))
    (True, False)
    """
    if a.value == b.value:
        return True
    if a.value.denominator == 1 and b.value.denominator == 1:
        return False  # integers compare exactly
    places = [x.places for x in (a, b) if x.places is not None]
    if not places:
        return False  # integers and fractions are exact: there is no rounding to forgive
    diff = abs(a.value - b.value)
    rounding = Fraction(1, 2) / Fraction(10) ** min(places)  # half a unit in the coarser last place
    within = max(Fraction(rel_tol) * max(abs(a.value), abs(b.value)), Fraction(abs_tol))
    return diff <= rounding and diff <= within


def answers_match(predicted: str | None, expected: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Numbers by `numbers_match` when both sides are numbers, else normalised text.

    >>> answers_match("72.0", "72"), answers_match("123456800", "123456789"), answers_match(" Paris", "paris")
    (True, False, True)
    """
    if predicted is None:
        return False
    a, b = read_number(predicted), read_number(expected)
    if a is not None and b is not None:
        return numbers_match(a, b, rel_tol, abs_tol)
    return " ".join(predicted.lower().split()) == " ".join(expected.lower().split())


def reference_answer(answer: str) -> str:
    """A dataset's answer column as a bare final answer: GSM8K keeps it after `####`."""
    marked = extract_final_answer(answer)
    return marked if marked is not None else answer.strip()
