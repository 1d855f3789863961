"""One Prefect task per pipeline stage; each reads params.yaml afresh, as `dvc repro` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from pipelines import config
from pipelines.paths import Paths
from pipelines.stages import run_stage


@task(name="apply-params")
def apply_params(root: Path, overrides: list[str], preset: str | None) -> None:
    """Persist the run's preset and overrides into params.yaml (what `dvc exp run -S` does)."""
    if overrides or preset is not None:
        config.write_params(Paths(root).params, overrides, preset)


@task(name="stage")
def stage(root: Path, name: str) -> dict[str, Any]:
    """Run one pipeline stage on the project at `root`."""
    paths = Paths(root)
    cfg = config.load(paths.params)
    result = run_stage(name, cfg, paths)
    _artifact(name, paths, result)
    return result


def _artifact(name: str, paths: Paths, result: dict[str, Any]) -> None:
    key = f"grpo-{name}"
    if name == "validate":
        table = "\n".join(f"| {k} | {v} |" for k, v in result.items())
        create_markdown_artifact(f"## Validation\n\n| field | value |\n|---|---|\n{table}\n", key=key)
    elif name == "evaluate" and paths.eval_report.exists():
        create_markdown_artifact(paths.eval_report.read_text(), key=key)
    elif name == "register":
        create_markdown_artifact(
            f"## Registry\n\nVersion **{result['version']}** of `{result['name']}`: "
            f"{'promoted to champion' if result['promoted'] else 'kept as challenger'} ({result['reason']}).\n",
            key=key,
        )
