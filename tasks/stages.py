"""One Prefect task per pipeline stage; each reads params.yaml afresh, as `dvc repro` does."""

from __future__ import annotations

import json
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
    try:
        result = run_stage(name, cfg, paths)
    except Exception:
        if name == "validate":
            _validation_artifact(paths)  # a refused dataset's report is the one people need to see
        raise
    _artifact(name, paths, result)
    return result


def _validation_artifact(paths: Paths) -> None:
    """reports/validation.json as a markdown table of expectations (passed or refused)."""
    from pipelines.data.report import markdown_summary

    if paths.validation_report.exists():
        report = json.loads(paths.validation_report.read_text(encoding="utf-8"))
        create_markdown_artifact(markdown_summary(report), key="grpo-validate")


def _artifact(name: str, paths: Paths, result: dict[str, Any]) -> None:
    key = f"grpo-{name}"
    if name == "validate":
        _validation_artifact(paths)
    elif name == "evaluate" and paths.eval_report.exists():
        create_markdown_artifact(_inline_chart(paths.eval_report), key=key)
    elif name == "register":
        checks = "".join(f"| {rule} | {'holds' if ok else 'fails'} |\n" for rule, ok in (result.get("checks") or {}).items())
        create_markdown_artifact(
            f"## Registry\n\nVersion **{result['version']}** of `{result['name']}`: "
            f"{'promoted to champion' if result['promoted'] else 'kept as challenger'} ({result['reason']}).\n"
            + (f"\n| gate rule | |\n|---|---|\n{checks}" if checks else ""),
            key=key,
        )


def _inline_chart(report: Path) -> str:
    """eval.md with its chart embedded: the Prefect UI cannot follow a link to a file beside the report."""
    import base64

    text = report.read_text()
    chart = report.with_name("eval.png")
    if chart.exists():
        data = base64.b64encode(chart.read_bytes()).decode()
        text = text.replace("](eval.png)", f"](data:image/png;base64,{data})")
    return text
