"""One pipeline run per workspace at a time.

Two runs in one project would interleave params.yaml writes, stage outputs and `dvc commit`s (and
DVC's own lock makes the second fail rather than wait). So a run holds the workspace: always by a
file lock (same machine, with or without a server), and, when a Prefect server is configured, also
by a global concurrency limit of 1 keyed by the project path, which the UI shows as an occupied slot
and which holds across machines that share the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def limit_name(root: Path) -> str:
    """`grpo-workspace-<folder>-<sha of the path>`: readable in the UI, unique per project path."""
    folder = re.sub(r"[^a-z0-9_-]+", "-", root.name.lower()).strip("-") or "root"
    return f"grpo-workspace-{folder}-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"


def lock_path(root: Path) -> Path:
    """In .dvc/tmp (ignored by git and DVC) of a DVC project, else in the system temp dir.

    Decided by .dvc alone, never by whether DVC has made tmp/ yet: two runs must pick the same file.
    """
    if (root / ".dvc").is_dir():
        tmp = root / ".dvc" / "tmp"
        tmp.mkdir(exist_ok=True)
        return tmp / "grpo-run.lock"
    return Path(tempfile.gettempdir()) / f"{limit_name(root)}.lock"


@contextlib.contextmanager
def file_lock(root: Path) -> Iterator[None]:
    """Wait for, then hold, the workspace's lock file (released by the OS if the process dies)."""
    path = lock_path(root)
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _logger().info("another pipeline run holds %s (lock %s): waiting for it to finish", root, path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger (shown in the UI) inside a flow run, else this module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _ensure_limit(name: str) -> None:
    """Create the limit (1 slot) if missing; a concurrent creator winning the race is fine."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, 1)
        except Exception as exc:  # 409 when another run created it between read and create
            if "409" not in str(exc) and "already exists" not in str(exc).lower():
                raise


@contextlib.contextmanager
def one_run_at_a_time(root: Path) -> Iterator[None]:
    """Hold the workspace at `root` for the duration of the block (see the module docstring)."""
    from prefect.settings import PREFECT_API_URL

    with contextlib.ExitStack() as stack:
        if PREFECT_API_URL.value():
            from prefect.concurrency.sync import concurrency

            name = limit_name(root)
            _ensure_limit(name)
            # The lease is renewed in the background while the run lives; a crashed run's slot expires.
            stack.enter_context(concurrency(name, occupy=1))
        stack.enter_context(file_lock(root))
        yield
