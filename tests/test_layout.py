"""The code's layout as rules: imports run one way, packages form no circle, pipelines/ imports Prefect
only where ARCHITECTURE.md says, and dvc.yaml's deps cover every module a stage runs (else a change to that
code would not make the stage stale)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipelines.stages import TABLE

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("flows", "tasks", "pipelines")  # top to bottom: a layer imports only itself and those below

# The module that runs each stage: the stage table's own (pipelines/stages.py), which dvc.yaml must match.
STAGE_ENTRY = {stage.name: stage.module for stage in TABLE}
# The lifecycle order of the stage packages: a package may import only packages of its rank or below.
# verifiers are pure functions every stage scores with; generation turns prompts into completions
# for training and evaluation alike.
RANK = {
    "pipelines.verifiers": 0,
    "pipelines.data": 1,
    "pipelines.snapshot": 2,
    "pipelines.generation": 3,
    "pipelines.grpo": 4,
    "pipelines.evaluation": 5,
    "pipelines.registry": 6,
}

# The one module of pipelines/ that uses Prefect: it sends the new-data event (`grpo data add` runs outside
# any flow) and reads the server's address, importing Prefect inside those functions only.
PREFECT_IN_PIPELINES = {"pipelines/data/events.py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports anywhere in it (inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports the module pkg.mod when there is one.
            names = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known] or [
                node.module
            ]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def prefect_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, inside a function) of each import of Prefect in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    in_functions = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name == "prefect" or name.startswith("prefect.") for name in names):
            found.append((node.lineno, id(node) in in_functions))
    return found


def import_graph() -> dict[str, set[str]]:
    known = project_modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def node_of(module: str) -> str:
    """The package graph's node: a subpackage of pipelines/ (pipelines.grpo), a core module
    (pipelines.config), or a layer (tasks, flows)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipelines" and len(parts) > 1 else parts[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle in a directed graph, as a path that ends where it starts, else None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def uncovered(stage: str, deps: list[str], graph: dict[str, set[str]], known: dict[str, Path]) -> list[str]:
    """Files of modules the stage runs that none of its deps (a file, or a folder above it) covers."""
    missing = []
    for module in sorted(closure(graph, STAGE_ENTRY[stage])):
        rel = known[module].relative_to(ROOT).as_posix()
        if module.startswith("pipelines") and not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps):
            missing.append(rel)
    return missing


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_pair_or_package_forms_a_circle():
    graph = import_graph()
    assert find_cycle(graph) is None, "modules import each other"
    packages: dict[str, set[str]] = {}
    for src, dsts in graph.items():
        packages.setdefault(node_of(src), set()).update(node_of(d) for d in dsts if node_of(d) != node_of(src))
    assert find_cycle(packages) is None, "packages import each other"


def test_imports_run_downward_and_stages_import_only_earlier_stages():
    wrong = []
    for src, dsts in import_graph().items():
        for dst in dsts:
            if LAYERS.index(src.split(".")[0]) > LAYERS.index(dst.split(".")[0]):
                wrong.append(f"{src} imports {dst} (a layer above it)")
            a, b = node_of(src), node_of(dst)
            if a in RANK and b in RANK and RANK[b] > RANK[a]:
                wrong.append(f"{src} imports {dst} (a later stage)")
            if a in RANK and b not in RANK and b.startswith("pipelines.") and b == "pipelines.stages":
                wrong.append(f"{src} imports the stage table")
    assert not wrong, "\n".join(wrong)


def test_pipelines_imports_prefect_only_inside_the_event_sender():
    """ARCHITECTURE.md's rule: pipelines/ imports and tests without Prefect; the one exception imports it
    inside functions."""
    wrong = []
    for path in sorted((ROOT / "pipelines").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, in_function in prefect_imports(path):
            if not in_function:
                wrong.append(f"{rel}:{line} imports Prefect at import time")
            elif rel not in PREFECT_IN_PIPELINES:
                wrong.append(f"{rel}:{line} imports Prefect (only {sorted(PREFECT_IN_PIPELINES)} may)")
    assert not wrong, "\n".join(wrong)
    for rel in PREFECT_IN_PIPELINES:  # an exception that is no longer needed is taken out of the rule
        assert prefect_imports(ROOT / rel), f"{rel} no longer imports Prefect: drop it from PREFECT_IN_PIPELINES"


def test_the_prefect_check_sees_an_import_at_module_level(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import prefect.events\n\n\ndef f():\n    from prefect import task\n")
    assert prefect_imports(module) == [(1, False), (5, True)]


def test_dvc_deps_cover_every_module_a_stage_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_ENTRY)
    graph, known = import_graph(), project_modules()
    missing = {name: uncovered(name, [str(d) for d in stage["deps"]], graph, known) for name, stage in stages.items()}
    assert not any(missing.values()), f"add these to the stage's deps in dvc.yaml: {missing}"
    for name, stage in stages.items():
        for dep in stage["deps"]:
            code = str(dep).startswith(("pipelines/", "tasks/", "flows/"))
            assert not code or (ROOT / dep).exists(), f"{name}: dep {dep} does not exist"


def test_the_deps_check_fails_when_a_dep_is_left_out():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    graph, known = import_graph(), project_modules()
    deps = [d for d in stages["evaluate"]["deps"] if d != "pipelines/generation"]
    assert any(m.startswith("pipelines/generation/") for m in uncovered("evaluate", deps, graph, known))


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRY))
def test_stage_entries_exist(stage):
    assert STAGE_ENTRY[stage] in project_modules()


def test_every_param_a_stage_declares_is_in_params_yaml():
    """DVC refuses to commit a stage whose declared params are missing from params.yaml."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = []
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        for key in stage.get("params", []):
            node = params
            for part in str(key).split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{name}: {key}")
                    break
                node = node[part]
    assert not missing, f"add to params.yaml: {missing}"
