"""One home per list: the stages, the loss types, the rollout backends, the built-in tasks and the
generic rewards are each spelled out once in the product's code, and everything else reads them
from there. A second spelling is how lists drift apart (a loss type missing from a second list gave
a wrong gradient only with several processes), so a literal collection elsewhere that names all of
a list's entries, or all but one, fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lists() -> dict[str, tuple[set[str], str]]:
    """Each list: its entries and the one file allowed to spell them."""
    from pipelines.config import LOSS_TYPES, ROLLOUT_BACKENDS
    from pipelines.stages import STAGES
    from pipelines.verifiers import catalog, rewards

    return {
        "stages": (set(STAGES), "pipelines/stages.py"),
        "loss types": (set(LOSS_TYPES), "pipelines/config.py"),
        "rollout backends": (set(ROLLOUT_BACKENDS), "pipelines/config.py"),
        "built-in tasks": (set(catalog.BUILTIN), "pipelines/verifiers/catalog.py"),
        "generic rewards": (set(rewards.REWARDS), "pipelines/verifiers/rewards.py"),
    }


def _collections(tree: ast.AST):
    """Every literal tuple, list, set, dict's keys and `Literal[...]` of strings, with its line."""
    for node in ast.walk(tree):
        items = None
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        if items is not None:
            names = {e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if names:
                yield node.lineno, names


def second_spellings() -> list[str]:
    found = []
    lists = _lists()
    for path in sorted(p for top in ("pipelines", "flows", "tasks") for p in (REPO / top).rglob("*.py")):
        where = path.relative_to(REPO).as_posix()
        for line, names in _collections(ast.parse(path.read_text())):
            for list_name, (entries, home) in lists.items():
                if where != home and len(entries) >= 3 and len(names & entries) >= len(entries) - 1:
                    found.append(f"{where}:{line} spells the {list_name} again (their home is {home})")
    return found


def test_each_list_is_spelled_once():
    assert second_spellings() == []


def test_a_second_spelling_is_found(tmp_path, monkeypatch):
    stray = REPO / "pipelines" / "_stray_list_for_test.py"
    stray.write_text('KINDS = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")\n')
    try:
        assert second_spellings() == [
            "pipelines/_stray_list_for_test.py:1 spells the loss types again (their home is pipelines/config.py)"
        ]
    finally:
        stray.unlink()


@pytest.mark.parametrize("name", ["stages", "loss types", "rollout backends", "built-in tasks", "generic rewards"])
def test_each_home_spells_its_list(name):
    entries, home = _lists()[name]
    constants = {n.value for n in ast.walk(ast.parse((REPO / home).read_text())) if isinstance(n, ast.Constant)}
    assert entries <= constants, f"{home} should spell the {name} ({sorted(entries - constants)} missing)"


def test_every_backend_the_config_names_is_implemented_under_that_name():
    from pipelines.config import ROLLOUT_BACKENDS
    from pipelines.generation.backends import BACKENDS

    assert sorted(BACKENDS) == sorted(ROLLOUT_BACKENDS)
    assert all(backend.name == name for name, backend in BACKENDS.items())


def test_the_files_outside_python_name_the_stages_in_the_tables_order():
    """dvc.yaml (DVC reads only its own file) and the command reference cannot import the table, so they
    are checked against it: the same stages, in lifecycle order, each run as `grpo <stage>`; the config
    section a stage takes is among the params dvc.yaml declares for it."""
    import re

    import yaml

    from pipelines.stages import STAGES, TABLE

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES), "dvc.yaml's stages must follow pipelines/stages.py's TABLE"
    for entry in TABLE:
        assert stages[entry.name]["cmd"] == f"grpo {entry.name}"
        assert entry.section is None or entry.section in stages[entry.name].get("params", []), entry.name
    listed = re.findall(r"^grpo (\w+) ", (REPO / "docs" / "commands.md").read_text(), re.M)
    assert [name for name in listed if name in STAGES] == list(STAGES), "docs/commands.md lists the stages"
