"""The `calculator` task: multiplication of two- and three-digit numbers, with a calculator tool.

The arithmetic is beyond a 135M model (the math task's multiplication tops out near 0.4); calling
a calculator and copying its result into a `#### N` line is not. The judge and the rewards are the
math task's, read on the episode's last turn (the answer); the worked example in the prompt shows
one call, the tool's reply and the answer. `grpo run --preset tools` trains it.
"""

from __future__ import annotations

from pipelines.verifiers import math_task
from pipelines.verifiers.countdown import ExpressionError, parse
from pipelines.verifiers.task import Golden, Task

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>'


def calculator(expression: str) -> str:
    """Compute an arithmetic expression exactly.

    Args:
        expression: integers with + - * / and parentheses, e.g. "23 * 47"
    """
    try:
        value = parse(expression).value  # parsed, never eval'd: integers, + - * / ( ) only (countdown.py)
    except ExpressionError as exc:
        return f"error: {exc}"
    return str(value.numerator) if value.denominator == 1 else f"{value} (= {float(value):.6g})"


TASK = Task(
    name="calculator",
    description="multiplication with a calculator tool: call it, then answer after ####",
    instruction=math_task.TASK.instruction,
    # Two worked calls: with one, the embedded SmolLM2 copies the answer's form and calls in about 1 of 20
    # sampled episodes, with two in about 2 of 3 (16 problems x 4 samples).
    examples=(
        {"question": "What is 23 * 47?", "call": CALL % "23 * 47", "result": "1081",
         "answer": "23 * 47 = 1081\n#### 1081"},
        {"question": "What is 512 * 36?", "call": CALL % "512 * 36", "result": "18432",
         "answer": "512 * 36 = 18432\n#### 18432"},
    ),
    judge=math_task.judge,
    rewards=math_task.TASK.rewards,
    correctness="accuracy",
    columns=("answer",),
    check_row=math_task.check_row,
    answer_of=math_task.TASK.answer_of,
    generate=math_task.arithmetic,
    lenient_name="last number right",
    tools=(calculator,),
    max_turns=3,
    tool_timeout=2.0,
    golden=(
        Golden("312 * 45 = 14040\n#### 14040", {"answer": "14040"}, correct=True, format=True, lenient=True,
               rewards={"accuracy": 1.0, "format": 1.0}),
        Golden(CALL % "312 * 45", {"answer": "14040"}, correct=False, format=False,
               rewards={"accuracy": 0.0, "format": 0.0}),
        Golden("#### 14041", {"answer": "14040"}, correct=False, format=True, lenient=False,
               rewards={"accuracy": 0.0, "format": 1.0}),
    ),
)  # fmt: skip
