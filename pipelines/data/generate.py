"""Offline data for the task: each task's own seeded generator (pipelines/verifiers/*_task.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipelines.config import GeneratorConfig
from pipelines.data.errors import DataError
from pipelines.verifiers.task import Task


def generate(cfg: GeneratorConfig, task: Task) -> Iterator[dict[str, Any]]:
    """Rows {id, prompt, answer, ...the task's columns} of the task's generator.

    >>> from pipelines.verifiers.math_task import TASK
    >>> next(generate(GeneratorConfig(num_rows=1), TASK))["id"]
    'add-7-2'
    """
    if task.generate is None:
        raise DataError(
            f"task {task.name!r} has no generator, and data.path is null: set data.path to your dataset "
            "(a JSONL/CSV/Parquet file or folder), or give the task a generate(cfg) function"
        )
    return task.generate(cfg)
