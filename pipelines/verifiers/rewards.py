"""Reward functions with TRL's contract: `f(prompts, completions, **columns) -> list[float | None]`.

Extra dataset columns (here `answer`) arrive as keyword arguments, one value per completion.
`None` means "not applicable to this row" and is skipped when rewards are combined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.verifiers.math_answer import answers_match, extract_final_answer, reference_answer, strict_answer

RewardFn = Callable[..., list[float | None]]


def _text(completion: Any) -> str:
    # TRL passes conversational completions as [{"role": "assistant", "content": ...}].
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


def accuracy_reward(prompts: list[Any], completions: list[Any], answer: list[str], **_: Any) -> list[float | None]:
    """1.0 when the marked final answer equals the reference answer (numeric tolerance), else 0.0.

    >>> accuracy_reward(["q"], ["2 + 2 = 4\\n#### 4"], answer=["4"])
    [1.0]
    >>> accuracy_reward(["q"], ["I think 5"], answer=["#### 4"])
    [0.0]
    """
    return [
        1.0 if answers_match(extract_final_answer(_text(c)), reference_answer(a)) else 0.0
        for c, a in zip(completions, answer, strict=True)
    ]


def format_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float | None]:
    """1.0 when the completion ends with the requested `#### N` line, else 0.0.

    >>> format_reward(["q"], ["3 * 4 = 12\\n#### 12", "12"])
    [1.0, 0.0]
    """
    return [1.0 if strict_answer(_text(c)) is not None else 0.0 for c in completions]


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
}


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward function {name!r} in train.rewards; choose from {sorted(REWARDS)}") from None
