"""Retries for the tasks that talk to servers (MLflow registry): transient failures only, with backoff.

A refused registration (the gate, files that do not match the evaluation, a missing version) fails
the same way every time, so retrying it only delays the error; a dropped connection, a 5xx or a
locked SQLite store usually passes a few seconds later.
"""

from __future__ import annotations

import logging
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
    """Prefect `retry_condition_fn`: retry only when the failure is transient, and say which it is
    (Prefect itself logs the retry's number and delay, and when retries are exhausted)."""
    exc = state.result(raise_on_failure=False)
    retry = isinstance(exc, BaseException) and is_transient(exc)
    if isinstance(exc, BaseException):
        name = getattr(task_run, "name", None) or getattr(task, "name", None) or "task"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        _logger().log(
            logging.WARNING if retry else logging.INFO,
            "%s: %s error, %s: %s",
            name,
            "transient" if retry else "lasting",
            "retrying while retries remain" if retry else "not retried",
            first,
        )
    return retry


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger (the Prefect UI shows it), or a plain one outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("grpo.retry")


# Keyword arguments for `@task(...)`/`.with_options(...)`: up to 3 retries after 2, 4 and 8 seconds,
# so a lasting outage costs at most 14 s of waiting on top of the attempts, each bounded by the MLflow
# HTTP settings the `grpo` command sets (pipelines/mlflow_store.py HTTP_SETTINGS: about 3 s when refused).
SERVER_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_condition_fn": transient,
}
