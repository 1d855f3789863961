"""The house style a test can check: no function in the product's code over MAX_LINES lines (ruff's
PLR0915 and C901 in pyproject.toml bound statements and branches; this bounds what a reader scrolls)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 80  # signature, docstring and body: a function past this is a sign to split it


def long_functions(repo: Path = REPO, roots: tuple[str, ...] = ("pipelines", "flows", "tasks")) -> list[str]:
    found = []
    for path in sorted(p for root in roots for p in (repo / root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found.append(f"{path.relative_to(repo).as_posix()}:{node.lineno} {node.name} is {lines} lines")
    return found


def test_no_function_is_longer_than_a_screenful():
    assert long_functions() == [], f"split these (at most {MAX_LINES} lines each)"


def test_a_long_function_is_found(tmp_path):
    (tmp_path / "pipelines").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "pipelines" / "long.py").write_text(f"def f():\n{body}\n")
    assert long_functions(tmp_path) == [f"pipelines/long.py:1 f is {MAX_LINES + 1} lines"]
