"""The training flow: the five stages as Prefect tasks, each versioned with DVC as it finishes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.naming import tag_this_run, training_run_name
from pipelines.stages import STAGES
from tasks import dvc, summary
from tasks.stages import apply_params, stage_task
from tasks.workspace import one_run_at_a_time


@flow(name="grpo-pipeline", flow_run_name=training_run_name, log_prints=True)
def training_pipeline(
    project: str = ".", preset: str | None = None, overrides: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    """validate -> snapshot -> train -> evaluate -> register, versioned in dvc.lock and the DVC remote.

    A stage whose deps, params and outs match dvc.lock is reused, not rerun (unless `force`). The
    `grpo-summary` artifact ends the run: the headline figures, the decision, the MLflow links.
    """
    root = Path(project).resolve()
    with one_run_at_a_time(root):
        apply_params(root, overrides or [], preset)
        tag_this_run(root)  # preset, data digest, params hash: as params.yaml now holds them
        results = run_stages(root, force)
        summary.publish(root, results)  # the run at a glance, as this flow run's own artifact
        return results


def run_stages(root: Path, force: bool = False) -> dict[str, Any]:
    """Run the stages dvc.lock does not show as current, `dvc commit` each one after it succeeds.

    So a failed stage leaves dvc.lock and the remote as the last good run left them. The outs are
    pushed before `register`: a version in the registry never names data the remote lacks.
    """
    logger = get_run_logger()
    results: dict[str, Any] = {}
    for name in STAGES:
        if name == "register":
            dvc.push(root)
        if not force and dvc.stage_is_current(root, name):
            logger.info("stage %s is up to date in dvc.lock: reusing its outputs", name)
            results[name] = {"reused": True}
            continue
        results[name] = stage_task(name)(root, name)
        dvc.commit(root, name)
    return results
