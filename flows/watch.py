"""The watcher flow: data that arrives without the CLI still becomes a version and an event.

Scheduled by `grpo serve` when `orchestration.watch` lists paths; each path whose content differs
from the version DVC holds is versioned, pushed and announced (`grpo.dataset.updated`), which
starts the retrain flow, exactly as `grpo data add PATH` would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from tasks.watch import version_if_changed
from tasks.workspace import one_run_at_a_time


@flow(name="grpo-watch", log_prints=True)
def watch(project: str = ".", paths: list[str] | None = None) -> dict[str, Any]:
    """Version and announce each watched path whose content changed; unchanged ones map to None."""
    from pipelines import config
    from pipelines.paths import Paths

    root = Path(project).resolve()
    watched = paths if paths is not None else config.load(Paths(root).params).orchestration.watch
    # DVC allows one process per workspace: wait for a running pipeline rather than fail beside it.
    with one_run_at_a_time(root):
        return {path: version_if_changed(root, path) for path in watched}
