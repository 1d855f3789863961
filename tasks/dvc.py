"""DVC calls made by the flow, as Prefect tasks. DVC allows one process per workspace, so these run one at a time."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from pipelines.dvc import run_dvc


@task(name="dvc-status")
def stage_is_current(root: Path, stage: str) -> bool:
    """True when dvc.lock says the stage's deps, params and outs are unchanged."""
    return json.loads(run_dvc(root, "status", "--json", stage) or "{}") == {}


@task(name="dvc-commit")
def commit(root: Path, stage: str) -> None:
    """Record the stage's deps, params and out hashes in dvc.lock and cache its outs."""
    run_dvc(root, "commit", "--force", stage)


@task(name="dvc-push", retries=2, retry_delay_seconds=[2, 10])
def push(root: Path) -> None:
    """Send cached data and checkpoints to the project's DVC remote."""
    run_dvc(root, "push")
