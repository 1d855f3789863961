"""DVC calls made by the flow. DVC allows one process per workspace, so these run one at a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from prefect import task


class DvcError(RuntimeError):
    pass


def dvc(root: Path, *args: str) -> str:
    """Run `dvc ARGS` in the project with the same interpreter as this process."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root}:\n{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


@task(name="dvc-status")
def stage_is_current(root: Path, stage: str) -> bool:
    """True when dvc.lock says the stage's deps, params and outs are unchanged."""
    return json.loads(dvc(root, "status", "--json", stage) or "{}") == {}


@task(name="dvc-commit")
def commit(root: Path, stage: str) -> None:
    """Record the stage's deps, params and out hashes in dvc.lock and cache its outs."""
    dvc(root, "commit", "--force", stage)


@task(name="dvc-push", retries=2, retry_delay_seconds=[2, 10])
def push(root: Path) -> None:
    """Send cached data and checkpoints to the project's DVC remote."""
    dvc(root, "push")
