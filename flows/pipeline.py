"""The training flow: the five stages as Prefect tasks, each versioned with DVC as it finishes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pipelines.stages import STAGES
from tasks import dvc
from tasks.stages import apply_params, stage


@flow(name="grpo-pipeline", log_prints=True)
def training_pipeline(
    project: str = ".", preset: str | None = None, overrides: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    """validate -> snapshot -> train -> evaluate -> register, then push to the DVC remote.

    A stage whose deps, params and outs match dvc.lock is reused, not rerun (unless `force`).
    """
    logger = get_run_logger()
    root = Path(project).resolve()
    apply_params(root, overrides or [], preset)
    results: dict[str, Any] = {}
    for name in STAGES:
        if not force and dvc.stage_is_current(root, name):
            logger.info("stage %s is up to date in dvc.lock: reusing its outputs", name)
            results[name] = {"reused": True}
            continue
        results[name] = stage(root, name)
        dvc.commit(root, name)
    dvc.push(root)
    return results
