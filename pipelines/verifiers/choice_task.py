"""The `choice` task: multiple choice, the answer is the letter of the right option.

- a row has `options` (2 to 26 texts) and `answer`, the right option's letter (`A`, `B`, ...);
  the options are shown under the question as `A. text` lines;
- judge: the final answer (after `####`, in `\\boxed{}` or `<answer>`) is read as a letter, with
  `(B)`, `B.` and `B)` accepted; `correct` when it is the right letter, `format` when it is a
  letter among the row's options, and the lenient reading also accepts the right option's text
  (`#### 56` for `B. 56`), case and spacing ignored;
- rewards: `choice` (the strict verdict, weight 1.0) and `choice_format` (weight 0.2);
- offline data: arithmetic questions with the right value among distractors (data.generator:
  operators, operand ranges, and `choice.options`).
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Iterator
from typing import Any

from pipelines.verifiers.math_answer import extract_final_answer, tail
from pipelines.verifiers.rewards import _text
from pipelines.verifiers.task import Golden, Reward, Task, Verdict

LETTERS = string.ascii_uppercase
_LETTER = re.compile(r"\(?([A-Za-z])[).:]?")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_NAMES = {"+": "add", "-": "sub", "*": "mul"}


def letter(answer: str | None) -> str | None:
    """The option letter an answer names (`B`, `(b)`, `B.`, `B)`), upper case; None otherwise.

    >>> letter("(b)"), letter("B."), letter("Bob") is None
    ('B', 'B', True)
    """
    if answer is None:
        return None
    match = _LETTER.fullmatch(answer.strip())
    return match.group(1).upper() if match else None


def _norm(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".")


def _options(row: dict[str, Any]) -> list[str]:
    options = row.get("options")
    return [str(o) for o in options] if isinstance(options, list) else []


def judge(completion: str, row: dict[str, Any]) -> Verdict:
    """The multiple-choice verdict on one completion.

    >>> row = {"options": ["54", "56", "63"], "answer": "B"}
    >>> judge("7 * 8 = 56\\n#### B", row)
    Verdict(correct=True, format=True, lenient=True, extracted='B')
    >>> judge("#### 56", row)
    Verdict(correct=False, format=False, lenient=True, extracted='56')
    """
    text = _text(completion)
    extracted = extract_final_answer(text)
    options = _options(row)
    chosen = letter(extracted)
    right = letter(str(row.get("answer", "")))
    correct = chosen is not None and chosen == right
    formatted = chosen is not None and chosen in LETTERS[: len(options)]
    lenient = correct
    if not lenient and right is not None and LETTERS.index(right) < len(options):
        said = extracted if extracted is not None else (tail(text).splitlines() or [""])[-1]
        said = re.sub(r"^\(?[A-Za-z][).:]\s+", "", said.strip())  # `B. 56` -> `56`
        lenient = bool(said) and _norm(said) == _norm(options[LETTERS.index(right)])
    return Verdict(correct=correct, format=formatted, lenient=lenient, extracted=extracted)


def choice_reward(
    prompts: list[Any], completions: list[Any], options: list[Any], answer: list[str], **_: Any
) -> list[float | None]:
    """1.0 when the final answer is the right option's letter (the judge's strict verdict), else 0.0.

    >>> choice_reward(["q"] * 2, ["#### B", "#### 56"], options=[["54", "56"]] * 2, answer=["B"] * 2)
    [1.0, 0.0]
    """
    return [
        1.0 if judge(c, {"options": o, "answer": a}).correct else 0.0
        for c, o, a in zip(completions, options, answer, strict=True)
    ]


def choice_format_reward(
    prompts: list[Any], completions: list[Any], options: list[Any], **_: Any
) -> list[float | None]:
    """1.0 when the final answer is the letter of one of the row's options (the judge's `format`).

    >>> choice_format_reward(["q"] * 3, ["#### (A)", "#### E", "A"], options=[["x", "y"]] * 3)
    [1.0, 0.0, 0.0]
    """
    return [
        1.0 if judge(c, {"options": o, "answer": ""}).format else 0.0 for c, o in zip(completions, options, strict=True)
    ]


def check_row(row: dict[str, Any]) -> str | None:
    """Why a row is not a multiple-choice problem; None when it is.

    >>> check_row({"options": ["1", "2"], "answer": "B"}) is None, check_row({"options": ["1", "2"], "answer": "C"})
    (True, 'answer must be the letter of one of its 2 options (A to B), got C')
    """
    options = row.get("options")
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
        return f"`options` must be a list of 2 to {len(LETTERS)} texts"
    if not all(isinstance(o, (str, int, float)) and not isinstance(o, bool) and str(o).strip() for o in options):
        return "every option must be a non-empty text or number"
    right = letter(str(row.get("answer", "")))
    if right is None or LETTERS.index(right) >= len(options):
        last = LETTERS[len(options) - 1]
        return f"answer must be the letter of one of its {len(options)} options (A to {last}), got {row.get('answer')}"
    return None


def render(question: str, row: dict[str, Any]) -> str:
    """The question with its options under it, one `A. text` line each.

    >>> render("What is 2 + 2?", {"options": ["3", "4"]})
    'What is 2 + 2?\\nA. 3\\nB. 4'
    """
    lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(_options(row))]
    return "\n".join([question, *lines])


def answer_of(answer: str) -> str:
    return letter(answer) or answer.strip()


def generate(cfg: Any) -> Iterator[dict[str, Any]]:
    """Distinct `a op b` questions with the right value among `cfg.choice.options` distinct options.

    >>> from pipelines.config import GeneratorConfig
    >>> row = next(generate(GeneratorConfig(num_rows=1)))
    >>> sorted(row), len(row["options"]), row["answer"] in "ABCD"
    (['answer', 'id', 'options', 'prompt'], 4, True)
    """
    space = [
        (a, op, b)
        for op in cfg.operators
        for a, b in itertools.product(range(cfg.a_min, cfg.a_max + 1), range(cfg.b_min, cfg.b_max + 1))
    ]
    rng = random.Random(cfg.seed)
    rng.shuffle(space)
    for a, op, b in space[: cfg.num_rows]:
        value = _APPLY[op](a, b)
        # Near misses, as a slip in the arithmetic would give: the value off by a little, or by an operand.
        near = {value + d for d in (-10, -2, -1, 1, 2, 10, a, -a, b, -b)} - {value}
        if value >= 0 and len({v for v in near if v >= 0}) >= cfg.choice.options - 1:
            near = {v for v in near if v >= 0}  # no negative options for a question without negatives
        distractors = rng.sample(sorted(near), cfg.choice.options - 1)
        options = [value, *distractors]
        rng.shuffle(options)
        yield {
            "id": f"choice-{_NAMES[op]}-{a}-{b}",
            "prompt": f"What is {a} {op} {b}?",
            "options": [str(o) for o in options],
            "answer": LETTERS[options.index(value)],
        }


_ROW = {"options": ["54", "56", "63", "48"], "answer": "B"}

TASK = Task(
    name="choice",
    description="the letter of the right option among the row's `options`",
    instruction="{question}\nGive the letter of the right option after ####.",
    examples=(
        {"question": render("What is 6 + 3?", {"options": ["8", "12", "9", "7"]}), "answer": "6 + 3 = 9\n#### C"},
    ),
    judge=judge,
    rewards=(Reward("choice", choice_reward, 1.0), Reward("choice_format", choice_format_reward, 0.2)),
    correctness="choice",
    columns=("answer", "options"),
    check_row=check_row,
    render=render,
    answer_of=answer_of,
    generate=generate,
    lenient_name="right option's text accepted",
    golden=(
        Golden("7 * 8 = 56\n#### B", _ROW, correct=True, format=True, lenient=True,
               rewards={"choice": 1.0, "choice_format": 1.0}),
        Golden("#### (b)", _ROW, correct=True, format=True, rewards={"choice": 1.0}),
        Golden("#### A", _ROW, correct=False, format=True, lenient=False,
               rewards={"choice": 0.0, "choice_format": 1.0}),
        Golden("#### 56", _ROW, correct=False, format=False, lenient=True,
               rewards={"choice": 0.0, "choice_format": 0.0}),
        Golden("#### E", _ROW, correct=False, format=False, lenient=False,
               rewards={"choice": 0.0, "choice_format": 0.0}),
        Golden("7 * 8 = 56, so\nB. 56", _ROW, correct=False, format=False, lenient=True, rewards={"choice": 0.0}),
        Golden("\\boxed{B}", _ROW, correct=True, format=True, rewards={"choice": 1.0}),
    ),
)  # fmt: skip
