"""ARCHITECTURE.md's maps cannot drift: every module under pipelines/, tasks/ and flows/ is named in it.

A module is named by its path (`pipelines/data/events.py`, or from its package: `data/events.py`) anywhere in
the file, or by its file name (`events.py`, or a name in it: `validate.run`) in its package's own part of the
maps: a table row whose first cell is the package (`data/`), or a section whose heading starts with it
(`### grpo/: ...`). A file name no other module has (`ledger.py`) counts anywhere. `__init__.py` files are
left out: they hold no code to find.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("pipelines", "tasks", "flows")
DOC = ROOT / "ARCHITECTURE.md"


def modules() -> list[Path]:
    """The modules the maps must name, relative to the repository root."""
    found = [p.relative_to(ROOT) for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))]
    return [p for p in found if p.name != "__init__.py"]


def package(module: Path) -> str:
    """How the maps head a module's package: `pipelines/` for the core, `data/` for pipelines/data/, `tasks/`."""
    parts = module.parts[:-1]
    return ("/".join(parts[1:]) if parts[0] == "pipelines" and len(parts) > 1 else parts[0]) + "/"


def scopes(doc: str) -> dict[str, str]:
    """{package: the text of the map rows and sections that belong to it}."""
    found: dict[str, list[str]] = {}
    heading = ""
    for line in doc.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip().split(":")[0].split(" ")[0]
        if heading:
            found.setdefault(heading, []).append(line)
        row = re.match(r"\|\s*`([\w/]+/)`\s*\|", line)
        if row:
            found.setdefault(row.group(1), []).append(line)
    return {key: "\n".join(lines) for key, lines in found.items()}


def unnamed(doc: str, mods: list[Path]) -> list[str]:
    """The modules `doc` does not name (see the module docstring)."""
    names = Counter(m.name for m in mods)
    by_package = scopes(doc)
    missing = []
    for module in mods:
        path = module.as_posix()
        from_package = f"{package(module)}{module.name}"
        # In scope, `stage.py` or a name in it (`stage.run`, the entry column of the stage table).
        named = rf"`({re.escape(module.name)}|{re.escape(module.stem)}\.\w+)[`(]"
        in_scope = re.search(named, by_package.get(package(module), ""))
        unique = names[module.name] == 1 and f"`{module.name}`" in doc
        if path not in doc and from_package not in doc and not in_scope and not unique:
            missing.append(path)
    return missing


def test_every_module_is_named_in_architecture_md():
    missing = unnamed(DOC.read_text(), modules())
    assert not missing, f"name these in ARCHITECTURE.md's maps, one line each on what they hold: {missing}"


def test_a_module_left_out_of_the_maps_is_found():
    mods = [
        Path("pipelines/registry/stage.py"),
        Path("pipelines/data/report.py"),
        Path("pipelines/evaluation/report.py"),
    ]
    doc = "### pipelines/: stages\n| `registry/` | `stage.run` |\n| `evaluation/` | `report.py` (eval.md) |\n"
    assert unnamed(doc, mods) == ["pipelines/data/report.py"]  # report.py is named, but for evaluation/
    assert unnamed(doc + "\nrejections: `data/report.py`\n", mods) == []
