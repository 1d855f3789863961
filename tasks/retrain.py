"""Tasks of the retrain flow: check the announced dataset, report what the run did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact


@task(name="check-dataset")
def check_dataset(root: Path, dataset_path: str, digest: str) -> str:
    """The dataset's sha256 now; a mismatch with the event means newer data, which is what trains."""
    from pipelines.hashing import content_digest

    path = Path(dataset_path) if Path(dataset_path).is_absolute() else root / dataset_path
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: the dataset announced by the event is not in the project. Fix: `grpo data add` it "
            "in this project (or `dvc pull` it) and send the event again."
        )
    now = content_digest(path)
    if now != digest:
        get_run_logger().warning(
            "%s changed since the event (event sha256 %s, now %s): training on the data as it is now",
            dataset_path,
            digest[:12],
            now[:12],
        )
    return now


@task(name="retrain-report")
def report(root: Path, dataset_path: str, digest: str, stages: dict[str, Any]) -> dict[str, Any]:
    """What the run did, for the caller and as the `grpo-retrain` artifact in the UI."""
    from pipelines.paths import Paths

    reused = all(result == {"reused": True} for result in stages.values())
    registry = Paths(root).registry_report
    last = json.loads(registry.read_text(encoding="utf-8")) if registry.exists() else {}
    if reused:
        message = (
            f"reused the last result: data {digest[:12]} and params are unchanged since the last run "
            f"(every stage current in dvc.lock); registered version stays v{last.get('version', '?')}"
        )
    else:
        decision = "promoted to champion" if last.get("promoted") else "kept as challenger"
        reason = last.get("reason", "no reason recorded")
        message = f"registered v{last.get('version', '?')} of {last.get('name', '?')}: {decision} ({reason})"
    get_run_logger().info(message)
    create_markdown_artifact(
        f"## Retrain on `{dataset_path}`\n\nsha256 `{digest}`\n\n{message}.\n\n"
        + "| stage | |\n|---|---|\n"
        + "".join(
            f"| {name} | {'reused' if result == {'reused': True} else 'ran'} |\n" for name, result in stages.items()
        ),
        key="grpo-retrain",
        description="what the retrain run did with the new data",
    )
    return {"dataset_path": dataset_path, "digest": digest, "reused": reused, "message": message, "stages": stages}
