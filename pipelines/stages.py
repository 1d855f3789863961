"""The five stages by name: what both drivers (`dvc repro` and the Prefect flow) call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from typing import Any

from pipelines.config import Config
from pipelines.paths import Paths

STAGES = ("validate", "snapshot", "train", "evaluate", "register")


def run_stage(name: str, cfg: Config, paths: Paths) -> dict[str, Any]:
    """Run one stage and return its result as a plain dict. Heavy imports happen here, not at import."""
    runner: Callable[[], Any]
    if name == "validate":
        from pipelines.data import validate

        runner = lambda: validate.run(cfg, paths)  # noqa: E731
    elif name == "snapshot":
        from pipelines.snapshot import stage as snapshot

        runner = lambda: snapshot.run(cfg.snapshot, paths)  # noqa: E731
    elif name == "train":
        from pipelines.grpo import trainer

        runner = lambda: trainer.run(cfg, paths)  # noqa: E731
    elif name == "evaluate":
        from pipelines.evaluation import stage as evaluate

        runner = lambda: evaluate.run(cfg, paths)  # noqa: E731
    elif name == "register":
        from pipelines.registry import stage as registry

        runner = lambda: registry.run(cfg, paths)  # noqa: E731
    else:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    result = runner()
    return asdict(result) if is_dataclass(result) else dict(result)
