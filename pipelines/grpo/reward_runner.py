"""Run the configured reward functions on a batch of completions, each under a time limit.

The limit is enforced with a worker thread, not SIGALRM, so it also works where the stage runs off
the main thread (Prefect tasks, servers). A verifier that raises, hangs or returns the wrong number
of values stops training with an error naming it: a silent zero would teach the model nonsense.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from typing import Any

import torch

from pipelines.config import RewardSpec
from pipelines.verifiers.rewards import get_reward


class RewardError(RuntimeError):
    """A reward function failed, hung, or broke the contract."""


def call_with_timeout(fn: Callable[..., Any], timeout: float, name: str, *args: Any, **kwargs: Any) -> Any:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread with the function's name
            box["error"] = exc

    # daemon: a verifier stuck in C code must not keep the process alive after we give up on it
    worker = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardError(
            f"reward function {name!r} did not finish within {timeout:g} s (train.reward_timeout); "
            "make it faster or raise the limit"
        )
    if "error" in box:
        exc = box["error"]
        raise RewardError(f"reward function {name!r} raised {type(exc).__name__}: {exc}") from exc
    return box["value"]


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
) -> tuple[torch.Tensor, dict[str, float]]:
    """(per-function rewards as an (N, F) tensor with NaN for None, each function's mean)."""
    prompts = [r["prompt"] for r in rows for _ in range(group)]
    columns = reward_columns(rows, group) | (extra or {})
    per_fn, means = [], {}
    for spec in specs:
        fn = functools.partial(get_reward(spec.name), **spec.params) if spec.params else get_reward(spec.name)
        values = call_with_timeout(fn, timeout, spec.name, prompts, texts, **columns)
        if not isinstance(values, (list, tuple)) or len(values) != len(texts):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(f"reward function {spec.name!r} returned {got} values for {len(texts)} completions")
        try:
            column = torch.tensor([math.nan if v is None else float(v) for v in values])
        except (TypeError, ValueError) as exc:
            raise RewardError(f"reward function {spec.name!r} returned a non-number: {exc}") from exc
        per_fn.append(column)
        means[f"rewards/{spec.name}/mean"] = float(column.nanmean()) if not column.isnan().all() else math.nan
    return torch.stack(per_fn, dim=1), means
