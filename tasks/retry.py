"""Retries for the tasks that talk to servers (MLflow registry): transient failures only, with backoff.

A refused registration (the gate, files that do not match the evaluation, a missing version) fails
the same way every time, so retrying it only delays the error; a dropped connection, a 5xx or a
locked SQLite store usually passes a few seconds later.
"""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

# Lower-cased fragments of the messages that servers and their clients give for passing trouble.
_TRANSIENT = (
    "connection refused",
    "connection reset",
    "connection aborted",
    "max retries exceeded",
    "timed out",
    "database is locked",
    "temporarily unavailable",
    "service unavailable",
    "bad gateway",
    "gateway timeout",
    "too many requests",
)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: lost connections, timeouts, 5xx/429 answers, a busy store.

    >>> is_transient(ConnectionRefusedError(111, "Connection refused")), is_transient(ValueError("bad gate"))
    (True, False)
    """
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(fragment in text for fragment in _TRANSIENT)


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the failure is transient."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


# Keyword arguments for `@task(...)`/`.with_options(...)`: up to 3 retries after 2, 4 and 8 seconds.
SERVER_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_condition_fn": transient,
}
