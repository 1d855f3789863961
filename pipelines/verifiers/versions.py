"""The version of each reward function and verifier: a sha256 of the code that computes its scores.

A version covers the function's own source (`inspect.getsource`), the source of every module of
pipelines/verifiers it depends on (its module and what that imports from this package, followed
transitively) and its golden cases (golden.json beside this file: completions with the scores they
must get, run by tests/test_verifier_versions.py). Changing any of them changes the hash, so a score
recorded under one hash was computed by exactly that code. `judge` is evaluation's verdict (judge.py).
Training records the hashes of its reward functions, evaluation those of `judge` and the rewards.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PACKAGE = "pipelines.verifiers"
HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden.json"


def golden_cases() -> dict[str, list[dict[str, Any]]]:
    """{name: [{"completion": str, "columns": {...}, "expected": score}]} (golden.json)."""
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def _function(name: str) -> Callable[..., Any]:
    from pipelines.verifiers import judge, rewards

    if name == "judge":
        return judge.judge
    return rewards.get_reward(name)


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


def verifier_version(name: str, fn: Callable[..., Any] | None = None) -> str:
    """sha256 of `name`'s source, its verifier modules and its golden cases."""
    fn = fn if fn is not None else _function(name)
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
    cases = golden_cases().get(name, [])
    digest.update(b"\0golden\0" + json.dumps(cases, sort_keys=True).encode())
    return digest.hexdigest()


def verifier_versions(names: Iterable[str]) -> dict[str, str]:
    """{name: sha256} for reward functions (train.rewards names) and `judge`.

    >>> v = verifier_versions(["accuracy", "judge"])
    >>> sorted(v), len(v["accuracy"])
    (['accuracy', 'judge'], 64)
    """
    return {name: verifier_version(name) for name in dict.fromkeys(names)}


def short(versions: dict[str, str], n: int = 8) -> str:
    """`accuracy=1a2b3c4d, format=...`: hashes cut to `n` characters, for messages.

    >>> short({"b": "0" * 64, "a": "f" * 64}, 4)
    'a=ffff, b=0000'
    """
    return ", ".join(f"{k}={v[:n]}" for k, v in sorted(versions.items()))


def score(name: str, case: dict[str, Any]) -> Any:
    """The score `name` gives one golden case (a reward: its value; `judge`: its verdict dict)."""
    fn = _function(name)
    if name == "judge":
        return fn(case["completion"], **case.get("columns", {}))
    columns = {k: [v] for k, v in case.get("columns", {}).items()}
    return fn(["q"], [case["completion"]], **columns, **case.get("options", {}))[0]
