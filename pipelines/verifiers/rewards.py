"""Reward functions with TRL's contract: `f(prompts, completions, **columns) -> list[float | None]`.

Extra dataset columns (here `answer`) arrive as keyword arguments, one value per completion.
`None` means "not applicable to this row" and is skipped when rewards are combined.

Answers are read and compared by math_answer.py's rules (its docstring): the last 16 KiB of a
completion, ASCII digits only, integers compared exactly. Training runs these functions in the
verifier worker process (runner.py), which is killed when one overruns `train.reward_timeout`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.verifiers.countdown import countdown_target, solves
from pipelines.verifiers.math_answer import answers_match, extract_final_answer, reference_answer, strict_answer

RewardFn = Callable[..., list[float | None]]


def _text(completion: Any) -> str:
    # TRL passes conversational completions as [{"role": "assistant", "content": ...}].
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


def accuracy_reward(prompts: list[Any], completions: list[Any], answer: list[str], **_: Any) -> list[float | None]:
    """1.0 when the completion's final `#### N` line holds the reference answer, else 0.0: the math
    task's strict verdict (judge.py), so that training rewards exactly what evaluation counts. Numbers
    compare as `math_answer.answers_match` says: integers exactly, decimals forgiven only their rounding.

    >>> accuracy_reward(["q"], ["2 + 2 = 4\\n#### 4"], answer=["4"])
    [1.0]
    >>> accuracy_reward(["q"] * 3, ["I think 5", "#### 1000001", "#### 1,000,000.0"], answer=["#### 1000000"] * 3)
    [0.0, 0.0, 1.0]
    """
    return [
        1.0 if answers_match(strict_answer(_text(c)), reference_answer(a)) else 0.0
        for c, a in zip(completions, answer, strict=True)
    ]


def format_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float | None]:
    """1.0 when the completion ends with the requested `#### N` line, else 0.0.

    >>> format_reward(["q"], ["3 * 4 = 12\\n#### 12", "12"])
    [1.0, 0.0]
    """
    return [1.0 if strict_answer(_text(c)) is not None else 0.0 for c in completions]


def length_reward(prompts: list[Any], completions: list[Any], target_chars: int = 200, **_: Any) -> list[float | None]:
    """1.0 at exactly `target_chars` characters, falling linearly to 0.0 at twice (or zero) that.

    >>> length_reward(["q", "q"], ["x" * 10, "x" * 15], target_chars=10)
    [1.0, 0.5]
    """
    return [max(0.0, 1.0 - abs(len(_text(c)) - target_chars) / target_chars) for c in completions]


def overlong_reward(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
    max_completion_length: int,
    soft_punish_cache: int = 16,
    **_: Any,
) -> list[float | None]:
    """DAPO's soft overlong punishment (eq. 13): 0 up to L_max - L_cache tokens, then falling
    linearly to -1 at L_max, and -1 beyond.

    >>> overlong_reward(["q"] * 3, ["", "", ""], completion_ids=[[1] * 70, [1] * 90, [1] * 101],
    ...                 max_completion_length=100, soft_punish_cache=20)
    [0.0, -0.5, -1.0]
    """
    start = max_completion_length - soft_punish_cache
    out: list[float | None] = []
    for ids in completion_ids:
        n = len(ids)
        if n <= start:
            out.append(0.0)
        elif n <= max_completion_length:
            out.append((start - n) / soft_punish_cache)
        else:
            out.append(-1.0)
    return out


def countdown_reward(
    prompts: list[Any],
    completions: list[Any],
    numbers: list[list[int] | None] | None = None,
    answer: list[str] | None = None,
    **_: Any,
) -> list[float | None]:
    """1.0 when the final answer (after `####`, in `\\boxed{}` or `<answer>`) is an expression of
    + - * / and parentheses that equals the target (`answer`), using each of `numbers` at most once.

    The expression is parsed, never evaluated by Python (pipelines/verifiers/countdown.py). Rows
    without numbers or an integer target are not countdown rows: None.

    >>> countdown_reward(["q"] * 3, ["50 + 25 = 75, 75 - 7 - 3 = 65\\n#### 50 + 25 - 7 - 3", "#### 50 + 15",
    ...                  "#### __import__('os')"], numbers=[[3, 7, 25, 50]] * 3, answer=["65"] * 3)
    [1.0, 0.0, 0.0]
    >>> countdown_reward(["q"], ["#### 1 + 2"], answer=["3"])  # no numbers column: not a countdown row
    [None]
    """
    out: list[float | None] = []
    # A dataset without these columns (a math dataset) has no countdown rows at all.
    numbers = numbers if numbers is not None else [None] * len(completions)
    answer = answer if answer is not None else [""] * len(completions)
    for c, nums, a in zip(completions, numbers, answer, strict=True):
        target = countdown_target(a)
        if target is None or not isinstance(nums, list):
            out.append(None)
            continue
        out.append(1.0 if solves(extract_final_answer(_text(c)), nums, target) else 0.0)
    return out


# The rewards any task may add to its own (train.rewards); a task's own rewards are its task's
# (math_task.py, countdown_task.py, choice_task.py, or a user's task file).
REWARDS: dict[str, RewardFn] = {
    "length": length_reward,
    "overlong": overlong_reward,
}
