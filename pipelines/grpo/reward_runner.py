"""Run the configured reward functions on a batch of completions, each under a time limit.

The functions run in the verifier worker process (pipelines/verifiers/runner.py): one message per
step carries every completion, and a function that overruns `train.reward_timeout` is stopped by
killing the worker, which a thread could not do (a regular expression holds the GIL). It works off
the main thread too (Prefect tasks, servers). A verifier that raises, hangs or returns the wrong
number of values stops training with an error naming it: a silent zero would teach the model nonsense.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipelines.config import RewardSpec
from pipelines.verifiers.catalog import reward_function
from pipelines.verifiers.runner import FunctionRaised, VerifierError, run_limited
from pipelines.verifiers.task import Task


class RewardError(VerifierError):
    """A reward function failed, hung, or broke the contract."""


def reward_columns(rows: list[dict[str, Any]], group: int) -> dict[str, list[Any]]:
    """Dataset columns repeated once per completion (TRL passes extra columns as kwargs)."""
    return {k: [r.get(k) for r in rows for _ in range(group)] for k in rows[0] if k != "prompt"}


def score(
    specs: list[RewardSpec],
    rows: list[dict[str, Any]],
    texts: list[str],
    group: int,
    *,
    timeout: float,
    extra: dict[str, Any] | None = None,
    task: Task | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(per-function rewards as an (N, F) tensor with NaN for None, each function's mean).

    Each function gets `timeout` seconds for the whole batch; `spec.params` are keyword arguments
    that the dataset's columns override (as `functools.partial` would). The names are the task's
    rewards (catalog.reward_function); no task = the math task.
    """
    if task is None:
        from pipelines.verifiers.math_task import TASK as task
    prompts = [r["prompt"] for r in rows for _ in range(group)]
    columns = reward_columns(rows, group) | (extra or {})
    jobs = [(spec.name, reward_function(task, spec.name), dict(spec.params)) for spec in specs]
    try:
        results = run_limited(
            jobs, (prompts, texts), columns, timeout=timeout, what="reward function", knob="train.reward_timeout"
        )
    except VerifierError as exc:
        where = _failing_row(exc, jobs, prompts, texts, columns, rows, group, timeout)
        error = RewardError(f"{exc}{where}")
        for note in getattr(exc, "__notes__", []):  # the worker's traceback
            error.add_note(note)
        raise error from exc
    per_fn, means = [], {}
    for spec, values in zip(specs, results, strict=True):
        if not isinstance(values, (list, tuple)) or len(values) != len(texts):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(
                f"reward function {spec.name!r} returned {got} values for {len(texts)} completions: it must return "
                "one float (or None) per completion"
            )
        column = torch.tensor(
            [math.nan if v is None else _finite(v, spec.name, i, rows, group) for i, v in enumerate(values)]
        )
        per_fn.append(column)
        means[f"rewards/{spec.name}/mean"] = float(column.nanmean()) if not column.isnan().all() else math.nan
    return torch.stack(per_fn, dim=1), means


def _finite(value: Any, name: str, index: int, rows: list[dict[str, Any]], group: int) -> float:
    """`value` as a float, or a RewardError naming the function, the completion and its row."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
        kind = f"a {type(value).__name__}"
    else:
        kind = "not a finite number"
    if math.isfinite(number):
        return number
    row = rows[index // group] if rows else {}
    raise RewardError(
        f"reward function {name!r} returned {value!r} ({kind}) for completion {index} (row {row.get('id')!r}): "
        "a reward must be a finite float, or None where it does not apply"
    )


def _failing_row(
    exc: VerifierError,
    jobs: list[tuple[str, Any, dict[str, Any]]],
    prompts: list[Any],
    texts: list[str],
    columns: dict[str, list[Any]],
    rows: list[dict[str, Any]],
    group: int,
    timeout: float,
) -> str:
    """` (first on completion i, row 'id')` for a function that raised on the batch: it is run again
    one completion at a time, in the worker, until it raises; "" when it did not raise (a timeout)
    or raises on none alone."""
    if not isinstance(exc, FunctionRaised):
        return ""
    job = next((j for j in jobs if j[0] == getattr(exc, "function", None)), None)
    if job is None:
        return ""
    per_item = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == len(texts)}
    for i in range(len(texts)):
        one = {k: ([v[i]] if k in per_item else v) for k, v in columns.items()}
        try:
            run_limited([job], ([prompts[i]], [texts[i]]), one, timeout=timeout, what="reward function", knob="")
        except VerifierError:
            return f" (first on completion {i}, row {rows[i // group].get('id')!r})"
    return ""
