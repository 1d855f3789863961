"""`grpo serve`: this project's deployments, served from one process (`prefect.serve`).

- grpo-pipeline/nightly: the training flow, on `orchestration.cron` (nightly by default);
- grpo-retrain/on-new-data: the retrain flow, on each `grpo.dataset.updated` event of this project;
- grpo-promote/manual: manual promotion with an optional approval step, run by hand;
- grpo-watch/watch: when `orchestration.watch` lists paths, every `watch_every_s` seconds.

prefect.yaml describes the same deployments for work pools. Deployment names are fixed, so serve
one project per Prefect server (a second `grpo serve` elsewhere would take the deployments over).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

    from pipelines.config import Config


class ServeError(RuntimeError):
    """`grpo serve` cannot start; the message says what to set up."""


def deployments(
    root: Path, cfg: Config, preset: str | None = None, overrides: list[str] | None = None
) -> list[RunnerDeployment]:
    """The deployments of the table above, with `project` (and the CLI's preset/-S) as default parameters."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron, Interval
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import training_pipeline
    from flows.promote import promote_model
    from flows.retrain import retrain
    from flows.watch import watch
    from pipelines.data.events import DATASET_UPDATED, PROJECT_LABEL, RESOURCE_PREFIX

    orch = cfg.orchestration
    project = str(root)
    # A flow run loads its flow by module path, so it works from any folder the package is installed for.
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["grpo"]}
    train_params: dict[str, Any] = {"project": project, "overrides": overrides or []}
    if preset:
        train_params["preset"] = preset
    served = [
        training_pipeline.to_deployment(
            "nightly",
            schedules=[Cron(orch.cron, timezone=orch.timezone)] if orch.cron else None,
            parameters=train_params,
            description=f"The five stages on {project}, on schedule `{orch.cron}` ({orch.timezone}).",
            **common,
        ),
        retrain.to_deployment(
            "on-new-data",
            parameters={"project": project, "overrides": overrides or []},
            triggers=[
                DeploymentEventTrigger(
                    name=f"retrain on {DATASET_UPDATED} ({root.name})",
                    enabled=orch.retrain_on_new_data,
                    expect={DATASET_UPDATED},
                    match={"prefect.resource.id": f"{RESOURCE_PREFIX}*", PROJECT_LABEL: project},
                    parameters={
                        "dataset_path": "{{ event.payload.path }}",
                        "digest": "{{ event.payload.digest }}",
                        "project": project,
                    },
                )
            ],
            description=f"Retrain {project} on the dataset a {DATASET_UPDATED} event names (`grpo data add`).",
            **common,
        ),
        promote_model.to_deployment(
            "manual",
            parameters={"project": project},
            description="Make a version champion by hand; require_approval pauses for a reviewer first.",
            **common,
        ),
    ]
    if orch.watch:
        served.append(
            watch.to_deployment(
                "watch",
                schedules=[Interval(orch.watch_every_s)],
                parameters={"project": project, "paths": list(orch.watch)},
                description=f"Version and announce {', '.join(orch.watch)} when their content changes.",
                **common,
            )
        )
    return served


def check_server() -> str:
    """The API URL of a reachable Prefect server, or a ServeError that says how to get one."""
    from prefect.client.orchestration import get_client

    from pipelines.data.events import api_url, prefect_problem, unreachable

    url = api_url()
    if not url:
        raise ServeError(
            "no Prefect server configured: run `prefect server start` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (events and schedules need a server)"
        )
    problem = prefect_problem(url)  # within seconds: the client below retries a silent host for minutes
    if problem is not None:
        raise ServeError(unreachable(url, problem))
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise ServeError(f"the Prefect server at {url} does not answer ({problem}); start it or fix PREFECT_API_URL")
    return url


def serve(root: Path, cfg: Config, preset: str | None = None, overrides: list[str] | None = None) -> None:
    """Register the deployments and run their flow runs until Ctrl-C (which pauses the schedules)."""
    from prefect import serve as prefect_serve

    check_server()
    prefect_serve(*deployments(root, cfg, preset, overrides))
