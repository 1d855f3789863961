"""Tasks of the promotion flow: move `champion` by hand (pipelines/registry/promotion.py) and say so in the UI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.retry import SERVER_RETRIES


@task(name="promote", **SERVER_RETRIES)
def promote_version(root: Path, version: str, reason: str, user: str | None) -> dict[str, Any]:
    """Make `version` champion, recording who and why on the version (the registry's own history)."""
    from pipelines import config
    from pipelines.mlflow_store import registry_client
    from pipelines.paths import Paths
    from pipelines.registry import promotion

    name = config.load(Paths(root).params).registry.model_name
    done = promotion.promote(registry_client(root), name, version, reason, user=user)
    create_markdown_artifact(
        f"## Promotion\n\n`{name}` **v{done['champion']}** is champion (was v{done['previous_champion'] or '-'}), "
        f"promoted by {done['by']}: {done['reason']}\n\nRoll back with `grpo rollback --reason TEXT`.",
        key="grpo-promotion",
        description="manual promotion: who, why, what it replaced",
    )
    return {**done, "promoted": True}


@task(name="promotion-refused")
def refused(version: str, reason: str, note: str) -> dict[str, Any]:
    """Record that the reviewer said no: nothing in the registry moved."""
    create_markdown_artifact(
        f"## Promotion refused\n\nv{version} was **not** promoted: the reviewer declined"
        f"{f' ({note})' if note else ''}. Requested because: {reason}",
        key="grpo-promotion",
        description="manual promotion declined at the approval step",
    )
    return {"champion": None, "version": version, "promoted": False, "reason": reason, "note": note}
