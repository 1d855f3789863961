"""The stages' own log lines (the `pipelines.*` loggers) in the Prefect run's logs.

pipelines/ logs with `logging.getLogger(__name__)` and knows nothing of Prefect. While a task runs
a stage, Prefect's API log handler is attached to the `pipelines` logger, with the run's ids
stamped on each record: so lines logged from any thread of the stage reach the task run's Logs tab
(the handler would otherwise look the run up in a context that threads do not inherit). It is what
PREFECT_LOGGING_EXTRA_LOGGERS=pipelines does, limited to the task; where that setting already
attached a handler, nothing is added. On the console the lines appear as before: through the
CLI's handler (pipelines/env.py) or Prefect's own console handler.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

DOMAIN_LOGGER = "pipelines"


class _RunIds(logging.Filter):
    """Stamp the flow and task run ids on records that carry none."""

    def __init__(self, flow_run_id: str | None, task_run_id: str | None) -> None:
        super().__init__()
        self.ids = {"flow_run_id": flow_run_id, "task_run_id": task_run_id}

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.ids.items():
            if value and not getattr(record, key, None):
                setattr(record, key, value)
        return True


@contextmanager
def domain_logs_to_prefect(level: int = logging.INFO) -> Iterator[None]:
    """Within a Prefect run: send `pipelines.*` records at `level` and above to the run's logs."""
    from prefect.logging.handlers import APILogHandler
    from prefect.runtime import flow_run, task_run

    logger = logging.getLogger(DOMAIN_LOGGER)
    if not flow_run.id:
        yield
        return
    handler = None
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        handler = APILogHandler(level=level)
        handler.addFilter(_RunIds(flow_run.id, task_run.id))
        logger.addHandler(handler)
    old_level = logger.level
    if logger.getEffectiveLevel() > level:  # Prefect's root logger stops at WARNING
        logger.setLevel(level)
    try:
        yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
        logger.setLevel(old_level)
