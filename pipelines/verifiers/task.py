"""A task: the one object that says what "right" means for a dataset.

It holds the prompt template, the reward functions with their default weights, the judge that
evaluation, validation during training and the promotion gate use, the columns a row needs, its
golden cases and (optionally) a generator of offline data. Training, evaluation and the lineage
all read the same task, so what training rewards is what evaluation judges: `correctness` names
the reward that must agree with the judge's strict verdict on every golden case.

Built-in tasks are modules of this package (math_task.py, countdown_task.py, choice_task.py; the
list is catalog.py's); a user's task is a `Task` in a file of their own repository, named in
params.yaml as `task: path/to/file.py:NAME` (docs/data-and-tasks.md, "Your own task").

Reward functions keep TRL's contract, `f(prompts, completions, **columns) -> list[float | None]`,
and the judge reads one completion: `judge(completion, row) -> Verdict`, where `row` holds the
dataset row's columns (`answer` and the task's own, e.g. `numbers`). Both run in the verifier
worker process under a time limit (runner.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import ConfigError

RewardFn = Callable[..., list[float | None]]
# Built-in prompt instructions put the question where `{question}` is (str.replace, never format).
DEFAULT_INSTRUCTION = "{question}"


@dataclass(frozen=True)
class Verdict:
    """The judge's reading of one completion.

    `correct` is the strict verdict (the answer in the task's required form, and right); `format`
    says the required form is there; `lenient` is a looser reading of rightness (math: the last
    number is right, in any form; choice: the option's text instead of its letter), None where the
    task has none (then it counts as `correct`); `extracted` is the answer as read, for reports
    and majority votes.
    """

    correct: bool
    format: bool
    lenient: bool | None = None
    extracted: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The verdict as evaluation stores it: `lenient` filled in with `correct` where the task has none.

        >>> Verdict(True, True).as_dict()
        {'extracted': None, 'correct': True, 'format': True, 'lenient': True}
        """
        lenient = self.correct if self.lenient is None else bool(self.lenient)
        return {
            "extracted": self.extracted,
            "correct": bool(self.correct),
            "format": bool(self.format),
            "lenient": lenient,
        }


@dataclass(frozen=True)
class Reward:
    """A reward function of a task, and its default weight in `train.rewards`."""

    name: str
    fn: RewardFn
    weight: float = 1.0


@dataclass(frozen=True)
class Golden:
    """A completion with the verdict and the rewards it must get.

    `row` holds the dataset columns the judge and the rewards read (`answer`, and the task's own);
    `format`, `lenient` and each of `rewards` are checked when given.
    """

    completion: str
    row: Mapping[str, Any]
    correct: bool
    format: bool | None = None
    lenient: bool | None = None
    rewards: Mapping[str, float | None] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """A stable form for hashing into the verifier versions."""
        return {
            "completion": self.completion,
            "row": dict(self.row),
            "correct": self.correct,
            "format": self.format,
            "lenient": self.lenient,
            "rewards": dict(self.rewards),
        }


@dataclass(frozen=True)
class Task:
    """Everything the pipeline needs to train on and judge one kind of problem (this module's docstring)."""

    name: str
    judge: Callable[[str, dict[str, Any]], Verdict]
    rewards: Sequence[Reward]
    correctness: str  # the name of the reward that must agree with `judge(...).correct`
    instruction: str = DEFAULT_INSTRUCTION
    system: str | None = None
    examples: Sequence[Mapping[str, str]] = ()  # worked examples, {question, answer}, as earlier chat turns
    columns: Sequence[str] = ("answer",)  # the dataset columns every row must have
    # Why a row is not a problem of this task (None when it is): run on every row by `grpo validate`.
    check_row: Callable[[dict[str, Any]], str | None] | None = None
    # The question text as the model sees it, from the row's prompt and columns (e.g. the options
    # of a multiple-choice row); None = the prompt as written.
    render: Callable[[str, dict[str, Any]], str] | None = None
    # The row's `answer` as the reference the judge compares with (math: GSM8K's `... #### N` -> N);
    # None = the answer's text, stripped.
    answer_of: Callable[[str], str] | None = None
    golden: Sequence[Golden] = ()
    # Offline data for `data.path: null`: rows {id, prompt, answer, ...columns} from data.generator.
    generate: Callable[[Any], Iterator[dict[str, Any]]] | None = None
    description: str = ""
    lenient_name: str = "lenient"  # what the lenient reading is, for reports ("last number right")
    # Tools the model may call between turns (tools.py: typed functions, run in the verifier worker),
    # and how many model turns an episode may take: the last one must answer. No tools: one turn.
    tools: Sequence[Callable[..., Any]] = ()
    max_turns: int = 1
    tool_timeout: float = 5.0  # seconds one tool call may take before the model is told it was stopped

    def __post_init__(self) -> None:
        names = [r.name for r in self.rewards]
        problems = []
        if not self.name or not isinstance(self.name, str):
            problems.append("`name` must be a non-empty string")
        if not callable(self.judge):
            problems.append("`judge` must be a function judge(completion, row) -> Verdict")
        if len(set(names)) != len(names):
            problems.append(f"reward names repeat: {names}")
        if self.correctness not in names:
            problems.append(f"`correctness` is {self.correctness!r}, which is not one of its rewards {names}")
        if "{question}" not in self.instruction:
            problems.append("`instruction` must contain {question}, where the row's question goes")
        problems += _tool_problems(self)
        if problems:
            raise TaskError(f"task {self.name!r}: " + "; ".join(problems))

    def reward(self, name: str) -> Reward | None:
        return next((r for r in self.rewards if r.name == name), None)

    @property
    def reward_names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @functools.cached_property
    def judge_batch(self) -> Callable[[list[str], list[dict[str, Any]]], list[dict[str, Any]]]:
        """One function for a batch, kept for the task's life: the verifier worker knows functions
        by identity, so a new function every call would restart it."""
        return functools.partial(judge_rows, self.name, self.judge)

    @functools.cached_property
    def check_rows(self) -> Callable[[list[dict[str, Any]]], list[str | None]]:
        """`check_row` over a batch of rows (the same identity rule as `judge_batch`)."""
        return functools.partial(check_rows, self.name, self.check_row)

    @functools.cached_property
    def golden_check(self) -> Callable[[], list[str]]:
        """`golden_problems` of this task (the same identity rule as `judge_batch`)."""
        return functools.partial(golden_problems, self)


def _tool_problems(task: Task) -> list[str]:
    # (Each tool's own signature and docstring are checked where a task is loaded, catalog.check_tools:
    # importing tools.py here would make every task's judge version depend on it.)
    problems = [] if all(callable(fn) for fn in task.tools) else ["every tool must be a function"]
    names = [getattr(fn, "__name__", "") for fn in task.tools]
    if len(set(names)) != len(names):
        problems.append(f"tool names repeat: {names}")
    if not isinstance(task.max_turns, int) or not 1 <= task.max_turns <= 16:
        problems.append(f"`max_turns` is {task.max_turns!r}; give 1 to 16")
    elif task.tools and task.max_turns < 2:
        problems.append("a task with tools needs `max_turns` of at least 2 (a call, then an answer)")
    if not task.tool_timeout > 0:
        problems.append("`tool_timeout` must be a positive number of seconds")
    return problems


class TaskError(ConfigError):
    """A task that cannot be loaded or used, or whose parts disagree; the message names the fix."""


class RowError(ValueError):
    """A task's function failed on one row; the message names the row and the error."""


def judge_rows(
    task_name: str, judge: Callable[[str, dict[str, Any]], Verdict], texts: list[str], rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`judge` on each completion and its row, checked against the contract (a Verdict back)."""
    out = []
    for index, (text, row) in enumerate(zip(texts, rows, strict=True)):
        try:
            verdict = judge(text, row)
        except Exception as exc:  # the row's id and the error, one line, for the user's code
            raise RowError(
                f"on row {row.get('id', index)!r} (completion {_short(text)}): {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(verdict, Verdict):
            raise TypeError(
                f"the judge of task {task_name!r} returned {type(verdict).__name__} for row {row.get('id', index)!r}; "
                "it must return pipelines.verifiers.task.Verdict(correct=..., format=...)"
            )
        out.append(verdict.as_dict())
    return out


def check_rows(
    task_name: str, check: Callable[[dict[str, Any]], str | None] | None, rows: list[dict[str, Any]]
) -> list[str | None]:
    """`check` on each row: None for a good row, else why not (a string)."""
    if check is None:
        return [None] * len(rows)
    out: list[str | None] = []
    for index, row in enumerate(rows):
        try:
            issue = check(row)
        except Exception as exc:
            raise RowError(f"on row {row.get('id', index)!r}: {type(exc).__name__}: {exc}") from exc
        if issue is not None and not isinstance(issue, str):
            raise TypeError(
                f"check_row of task {task_name!r} returned {type(issue).__name__} for row {row.get('id')!r}; "
                "it must return None (a good row) or a string saying what is wrong"
            )
        out.append(issue)
    return out


def golden_problems(task: Task) -> list[str]:
    """Every way the task's golden cases disagree with its judge and rewards, one line each; [] = all agree.

    Runs the user's code: call it in the verifier worker (`check_golden`).
    """
    problems = []
    for index, case in enumerate(task.golden):
        where = f"task {task.name!r} golden case {index} ({_short(case.completion)})"
        try:
            verdict = task.judge(case.completion, dict(case.row))
        except Exception as exc:
            problems.append(f"{where}: the judge raised {type(exc).__name__}: {exc}")
            continue
        if not isinstance(verdict, Verdict):
            problems.append(
                f"{where}: the judge returned {type(verdict).__name__}, not a Verdict(correct=..., format=...)"
            )
            continue
        checks = {"correct": case.correct, "format": case.format, "lenient": case.lenient}
        for reading, expected in checks.items():
            got = getattr(verdict, reading, None)
            if reading == "lenient" and got is None:
                got = verdict.correct
            if expected is not None and bool(got) != bool(expected):
                problems.append(f"{where}: the judge says {reading}={bool(got)}, the case expects {expected}")
        for reward in task.rewards:
            value = _golden_reward(task, reward.name, reward.fn, case, where, problems)
            if value is _FAILED:
                continue
            expected = case.rewards.get(reward.name, _UNSET)
            if expected is not _UNSET and not _same(value, expected):
                problems.append(f"{where}: reward {reward.name!r} gives {value!r}, the case expects {expected!r}")
            if reward.name == task.correctness and (value == 1.0) != bool(verdict.correct):
                problems.append(
                    f"{where}: the correctness reward {reward.name!r} gives {value!r} but the judge says "
                    f"correct={bool(verdict.correct)}; they must agree (1.0 exactly when correct)"
                )
    return problems


_FAILED = object()
_UNSET = object()


def _golden_reward(task: Task, name: str, fn: RewardFn, case: Golden, where: str, problems: list[str]) -> Any:
    columns = {k: [v] for k, v in case.row.items()}
    try:
        values = fn(["q"], [case.completion], **columns)
    except Exception as exc:
        problems.append(f"{where}: reward {name!r} raised {type(exc).__name__}: {exc}")
        return _FAILED
    if not isinstance(values, (list, tuple)) or len(values) != 1:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        problems.append(f"{where}: reward {name!r} returned {got} values for 1 completion")
        return _FAILED
    return values[0]


def _same(value: Any, expected: Any) -> bool:
    if value is None or expected is None:
        return value is expected
    try:
        return abs(float(value) - float(expected)) <= 1e-9
    except (TypeError, ValueError):
        return False


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")
