"""Extract and compare final answers in model output.

Model output is untrusted text: it is parsed with regular expressions and a brace counter,
never evaluated (no eval/exec, no sympy parsing).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_STRICT_TAIL = re.compile(r"####\s*(-?\$?\s*\d[\d,]*(?:\.\d+)?)\s*\.?\s*$")


def boxed_contents(text: str) -> list[str]:
    r"""Contents of every `\boxed{...}`, matching nested braces.

    >>> boxed_contents(r"so \boxed{\frac{1}{2}} and \boxed{3}")
    ['\\frac{1}{2}', '3']
    """
    found = []
    start = text.find("\\boxed{")
    while start != -1:
        i = start + len("\\boxed{")
        depth = 1
        j = i
        while j < len(text) and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        if depth == 0:
            found.append(text[i : j - 1])
        start = text.find("\\boxed{", j if depth == 0 else i)
    return found


def extract_final_answer(text: str) -> str | None:
    """The final answer marked by `#### N`, `\\boxed{N}` or `<answer>N</answer>` (the last one wins).

    >>> extract_final_answer("3 + 4 = 7\\n#### 7")
    '7'
    >>> extract_final_answer("no marker, just 12") is None
    True
    """
    hashes = _HASHES.findall(text)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    return None


def strict_answer(text: str) -> str | None:
    """The number in a trailing `#### N` line, the format the prompts ask for; else None."""
    match = _STRICT_TAIL.search(text.strip())
    return match.group(1) if match else None


def last_number(text: str) -> str | None:
    """The last number anywhere in the text (a lenient reading of what the model meant)."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def parse_number(text: str) -> float | None:
    """A number written as `1,234`, `$5`, `-3.5`, `7.` or `3/4`; None when it is not one.

    >>> parse_number("$1,234.50")
    1234.5
    >>> parse_number("3/4")
    0.75
    >>> parse_number("seven") is None
    True
    """
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    cleaned = cleaned.removeprefix("\\$")
    if not cleaned or len(cleaned) > 64:
        return None
    try:
        if "/" in cleaned:
            num, den = cleaned.split("/", 1)
            value = float(Fraction(int(num), int(den)))
        else:
            value = float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def answers_match(predicted: str | None, expected: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Numeric comparison with tolerance when both sides are numbers, else normalised text."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(expected)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
    return " ".join(predicted.lower().split()) == " ".join(expected.lower().split())


def reference_answer(answer: str) -> str:
    """A dataset's answer column as a bare final answer: GSM8K keeps it after `####`."""
    marked = extract_final_answer(answer)
    return marked if marked is not None else answer.strip()
