"""The tasks: the built-in ones by name, a user's from a file or a module, and the checks that
keep a task's parts in agreement (task.py says what a task is).

`task:` in params.yaml is one of `BUILTIN`'s names, `path/to/file.py:NAME` (a file of the user's
repository, relative to the project) or `package.module:NAME` (an importable module). NAME is a
`Task` (or a subclass of Task, built with no arguments); `path/to/file.py` alone takes the file's
`TASK`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from pipelines.verifiers.task import RewardFn, Task, TaskError

# The built-in tasks, by the name params.yaml gives them, and the module that holds each `TASK`.
BUILTIN = {
    "math": "pipelines.verifiers.math_task",
    "countdown": "pipelines.verifiers.countdown_task",
    "choice": "pipelines.verifiers.choice_task",
    "calculator": "pipelines.verifiers.calculator_task",
}


def is_builtin(spec: str) -> bool:
    return spec in BUILTIN


def split_spec(spec: str) -> tuple[str, str | None]:
    """(`file or module`, attribute or None) of a user task's spec.

    >>> split_spec("my_task.py:Yes"), split_spec("tasks_pkg.yes:TASK"), split_spec("my_task.py")
    (('my_task.py', 'Yes'), ('tasks_pkg.yes', 'TASK'), ('my_task.py', None))
    """
    where, sep, attr = spec.rpartition(":")
    if not sep or not attr or "/" in attr or attr.endswith(".py"):
        return spec, None
    return where, attr


def load(spec: str, root: Path) -> Task:
    """The task `spec` names (this module's docstring), checked to be a Task."""
    if is_builtin(spec):
        return check_tools(importlib.import_module(BUILTIN[spec]).TASK)
    where, attr = split_spec(spec)
    if where.endswith(".py"):
        module = _load_file(spec, where, root)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise TaskError(
                f"task {spec!r}: cannot import module {where!r} ({exc}); name a built-in task "
                f"({', '.join(BUILTIN)}), a file (path/to/my_task.py:NAME) or an installed module (package.module:NAME)"
            ) from None
        except Exception as exc:
            raise TaskError(f"task {spec!r}: importing {where!r} failed: {type(exc).__name__}: {exc}") from None
    return check_tools(_task_in(module, spec, attr))


def check_tools(task: Task) -> Task:
    """`task`, once each of its tools can be described to the model and called with checked arguments
    (verifiers/tools.py); a TaskError naming the tool and the fix otherwise."""
    from pipelines.verifiers.tools import check_tool

    problems = [p for p in (check_tool(fn) for fn in task.tools) if p]
    if problems:
        raise TaskError(
            f"task {task.name!r}: " + "; ".join(problems) + " (a tool is a function with type hints and a "
            "Google-style docstring with an Args: line per parameter)"
        )
    return task


def _load_file(spec: str, where: str, root: Path) -> Any:
    path = Path(where)
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_file():
        raise TaskError(
            f"task {spec!r}: file {path} not found; the path is relative to the project folder "
            f"({root}), or name a built-in task ({', '.join(BUILTIN)})"
        )
    # One stable module name per file: the verifier worker (forked) and pickling find its functions
    # under it, and loading the same file twice gives the same module.
    name = "grpo_user_task_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    content = hashlib.sha256(path.read_bytes()).hexdigest()
    if getattr(sys.modules.get(name), "_grpo_content", None) == content:
        return sys.modules[name]  # the same file, unchanged: the same Task object (the worker knows its functions)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise TaskError(f"task {spec!r}: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        line = _user_line(exc, path)
        raise TaskError(f"task file {path}{line} failed to load: {type(exc).__name__}: {exc}") from None
    module._grpo_content = content
    return module


def _user_line(exc: BaseException, path: Path) -> str:
    """`, line N` of the innermost frame in the user's file, for the error message."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f", line {exc.lineno}"
    return f", line {frames[-1].lineno}" if frames else ""


def _task_in(module: Any, spec: str, attr: str | None) -> Task:
    where = getattr(module, "__file__", None) or module.__name__
    if attr is None:
        found = [v for v in vars(module).values() if isinstance(v, Task)]
        value = getattr(module, "TASK", None) or (found[0] if len(found) == 1 else None)
        if value is None:
            raise TaskError(
                f"task {spec!r}: {where} defines no TASK (found {len(found)} Task objects); "
                "write `path/to/file.py:NAME` with the name of its Task"
            )
    else:
        if not hasattr(module, attr):
            raise TaskError(f"task {spec!r}: {where} has no {attr!r}; define `{attr} = Task(...)` there")
        value = getattr(module, attr)
    if inspect.isclass(value) and issubclass(value, Task):
        try:
            value = value()
        except TypeError as exc:
            raise TaskError(
                f"task {spec!r}: {value.__name__}() needs no arguments to be used as a task ({exc})"
            ) from None
    if not isinstance(value, Task):
        raise TaskError(
            f"task {spec!r}: {attr or 'TASK'} in {where} is a {type(value).__name__}, not a "
            "pipelines.verifiers.task.Task; build it as Task(name=..., judge=..., rewards=[...], correctness=...)"
        )
    return value


# ---- rewards: the task's own, generic ones, never another task's correctness ---------------------


def reward_function(task: Task, name: str) -> RewardFn:
    """The function `train.rewards` names: the task's own, else a generic one (rewards.REWARDS:
    length, overlong); another built-in task's reward is refused, naming the right one."""
    from pipelines.verifiers import rewards

    own = task.reward(name)
    if own is not None:
        return own.fn
    for other, module in BUILTIN.items():
        if other != task.name and importlib.import_module(module).TASK.reward(name) is not None:
            raise TaskError(
                f"train.rewards names {name!r}, a reward of the {other} task, but task is {task.name}: training "
                f"would reward what evaluation does not judge. Use the {task.name} task's rewards "
                f"({', '.join(task.reward_names)}), or set task: {other}"
            )
    if name in rewards.REWARDS:
        return rewards.REWARDS[name]
    raise TaskError(
        f"unknown reward function {name!r} in train.rewards; the {task.name} task has "
        f"{', '.join(task.reward_names)}, and any task can add {', '.join(sorted(rewards.REWARDS))}"
    )


def default_rewards(task: Task) -> list[dict[str, Any]]:
    """`train.rewards` when params.yaml leaves it null: the task's rewards at their default weights."""
    return [{"name": r.name, "weight": r.weight} for r in task.rewards]


def with_rewards(cfg: Any, task: Task) -> Any:
    """The config with `train.rewards` filled in (null = the task's own) and every name checked
    against the task (another task's reward is refused: `reward_function`)."""
    from pipelines.config import RewardSpec

    specs = cfg.train.rewards or [RewardSpec(**d) for d in default_rewards(task)]
    for spec in specs:
        reward_function(task, spec.name)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"rewards": specs})})


def correctness_warning(task: Task, names: list[str]) -> str | None:
    """A loud line when `train.rewards` leaves out the task's correctness reward (training then
    rewards something the judge does not count); None when it is there."""
    if task.correctness in names:
        return None
    return (
        f"train.rewards ({', '.join(names)}) leaves out {task.correctness!r}, the {task.name} task's correctness "
        "reward: training rewards something evaluation does not judge. Add it (or leave train.rewards null for "
        "the task's own rewards)"
    )


# ---- golden cases: the judge and the rewards on known completions -------------------------------


def check_golden(task: Task, *, timeout: float, knob: str) -> None:
    """Refuse a task whose golden cases disagree with its judge or rewards (TaskError, every
    disagreement named), or that has none; run in the verifier worker under `timeout`."""
    from pipelines.verifiers.runner import VerifierError, run_limited

    if not task.golden:
        raise TaskError(
            f"task {task.name!r} has no golden cases: give it golden=[Golden(completion, row, correct=...), ...], "
            "completions with the verdict and rewards they must get, so that the judge and the rewards are "
            "checked to agree before anything trains on them"
        )
    try:
        (problems,) = run_limited(
            [(f"golden cases of task {task.name}", task.golden_check, {})], (), {}, timeout=timeout,
            what="verifier", knob=knob,
        )  # fmt: skip
    except VerifierError as exc:
        raise TaskError(str(exc)) from None
    if problems:
        raise TaskError(
            f"task {task.name!r}: {len(problems)} golden check(s) failed, so its judge and rewards disagree "
            "(fix the task, or its golden cases if they are wrong): " + "; ".join(problems)
        )
