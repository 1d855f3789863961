"""The watcher's task: `grpo data add` for a watched path whose content DVC does not hold yet."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from pipelines.dvc import run_dvc


def changed(root: Path, source: Path) -> bool:
    """True when data/raw has no DVC-versioned copy of `source` with the same content."""
    from pipelines.data.versioning import raw_dir
    from pipelines.hashing import content_digest
    from pipelines.paths import Paths

    target = raw_dir(Paths(root)) / source.name
    dvc_file = target.with_name(f"{target.name}.dvc")
    if not dvc_file.exists() or not target.exists():
        return True
    if source.resolve() != target.resolve() and content_digest(source) != content_digest(target):
        return True
    # Same file (or same content): changed only if it differs from what the .dvc file records.
    return json.loads(run_dvc(root, "status", "--json", dvc_file.relative_to(root).as_posix()) or "{}") != {}


@task(name="version-if-changed", task_run_name="watch {watched}")
def version_if_changed(root: Path, watched: str) -> dict[str, Any] | None:
    """Version, push and announce `watched` (as `grpo data add` does) if it changed; None if not."""
    from pipelines.data.events import emit_dataset_updated
    from pipelines.data.versioning import add_raw
    from pipelines.paths import Paths

    logger = get_run_logger()
    source = Path(watched) if Path(watched).is_absolute() else root / watched
    if not source.exists():
        logger.warning("%s: watched path not found; nothing to version", source)
        return None
    if not changed(root, source):
        logger.info("%s: unchanged since it was last versioned", watched)
        return None
    added = add_raw(Paths(root), source, push=True)
    sent = emit_dataset_updated(root, added.path, added.digest, dvc_file=added.dvc_file, pushed=added.pushed)
    (logger.info if sent.sent else logger.warning)(sent.message)
    return {**asdict(added), "event_sent": sent.sent}
