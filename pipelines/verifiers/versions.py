"""The version of each reward function and judge: a sha256 of the code that computes its scores.

A version covers the function's own source (`inspect.getsource`), the code it depends on (for this
package: every module of pipelines/verifiers its module imports, transitively; for a user's task:
the whole task file) and its golden cases (the task's own, or for the generic rewards golden.json
beside this file, run by tests/test_verifier_versions.py). Changing any of them changes the hash, so
a score recorded under one hash was computed by exactly that code. `judge` is the task's judge.
Training records the hashes of its reward functions, evaluation the judge's; both reach the
registered version as `verifier_<name>_sha256` tags.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipelines.verifiers.task import Task

PACKAGE = "pipelines.verifiers"
HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden.json"


def golden_cases() -> dict[str, list[dict[str, Any]]]:
    """{name: [{"completion": str, "columns": {...}, "expected": score}]} of the generic rewards
    (golden.json); a task's own rewards and judge are pinned by the task's golden cases."""
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def _local_imports(module_file: Path) -> set[str]:
    """Modules of this package that `module_file` imports (`from pipelines.verifiers.x import ...`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(module_file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE + "."):
            names.add(node.module.removeprefix(PACKAGE + ".").split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module == PACKAGE:
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(
                a.name.removeprefix(PACKAGE + ".").split(".")[0] for a in node.names if a.name.startswith(PACKAGE + ".")
            )
    return {n for n in names if (HERE / f"{n}.py").exists()}


def dependencies(module_name: str) -> list[Path]:
    """The package's modules `module_name` depends on, itself included, transitively, sorted."""
    seen: set[str] = set()
    todo = [module_name]
    while todo:
        name = todo.pop()
        if name in seen or not (HERE / f"{name}.py").exists():
            continue
        seen.add(name)
        todo.extend(_local_imports(HERE / f"{name}.py"))
    return [HERE / f"{n}.py" for n in sorted(seen)]


def verifier_version(fn: Callable[..., Any], golden: Any) -> str:
    """sha256 of `fn`'s source, the code it depends on and its golden cases.

    The code: for this package's functions, the modules of pipelines/verifiers it imports
    (transitively); for a user's function, the whole file it is defined in (a task file).
    """
    digest = hashlib.sha256()
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):  # a function defined where no source is kept (a REPL, a C extension)
        source = f"<no source: {getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}>"
    digest.update(b"source\0" + source.encode())
    module = getattr(fn, "__module__", "") or ""
    if module.startswith(PACKAGE + "."):
        for path in dependencies(module.removeprefix(PACKAGE + ".")):
            digest.update(f"\0module {path.name}\0".encode() + path.read_bytes())
    else:
        file = getattr(sys.modules.get(module), "__file__", None)
        if file and Path(file).is_file():
            digest.update(f"\0file {Path(file).name}\0".encode() + Path(file).read_bytes())
    digest.update(b"\0golden\0" + json.dumps(golden, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def verifier_versions(task: Task, names: Iterable[str]) -> dict[str, str]:
    """{name: sha256} for reward functions (train.rewards names) and `judge` (the task's judge).

    >>> from pipelines.verifiers.math_task import TASK
    >>> v = verifier_versions(TASK, ["accuracy", "judge"])
    >>> sorted(v), len(v["accuracy"])
    (['accuracy', 'judge'], 64)
    """
    from pipelines.verifiers.catalog import reward_function

    own_golden = [case.as_json() for case in task.golden]
    generic = golden_cases()
    out = {}
    for name in dict.fromkeys(names):
        if name == "judge":
            out[name] = verifier_version(task.judge, {"task": task.name, "cases": own_golden})
        elif task.reward(name) is not None:
            out[name] = verifier_version(reward_function(task, name), {"task": task.name, "cases": own_golden})
        else:
            out[name] = verifier_version(reward_function(task, name), generic.get(name, []))
    if task.tools:  # what a tool returns is part of every score of an episode that called it
        parts = sorted(f"{fn.__name__}={verifier_version(fn, {'task': task.name})}" for fn in task.tools)
        out["tools"] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return out


def short(versions: dict[str, str], n: int = 8) -> str:
    """`accuracy=1a2b3c4d, format=...`: hashes cut to `n` characters, for messages.

    >>> short({"b": "0" * 64, "a": "f" * 64}, 4)
    'a=ffff, b=0000'
    """
    return ", ".join(f"{k}={v[:n]}" for k, v in sorted(versions.items()))


def score(name: str, case: dict[str, Any]) -> Any:
    """The score the generic reward `name` gives one of its golden cases (golden.json)."""
    from pipelines.verifiers.rewards import REWARDS

    fn = REWARDS[name]
    columns = {k: [v] for k, v in case.get("columns", {}).items()}
    return fn(["q"], [case["completion"]], **columns, **case.get("options", {}))[0]
