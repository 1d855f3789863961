"""MLflow logging for a training run: params once, metrics per step, a table of sample completions."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipelines.config import Config
from pipelines.paths import Paths


class RunLogger:
    """Opens (or, on resume, reopens) the training run; does nothing when disabled."""

    def __init__(self, paths: Paths, cfg: Config, enabled: bool, run_id: str | None = None) -> None:
        self.enabled = enabled
        self.run_id = run_id
        self.samples = cfg.train.log_samples
        self.group = cfg.train.num_generations
        if not enabled:
            return
        import mlflow

        from pipelines.mlflow_store import flatten, setup

        setup(paths.root, cfg.registry.experiment)
        if run_id is not None:
            try:
                mlflow.start_run(run_id=run_id)
                return
            except mlflow.exceptions.MlflowException:
                pass  # the store that held it is gone (e.g. a fresh clone): open a new run
        run = mlflow.start_run(run_name=f"grpo-{cfg.snapshot.source}-{cfg.train.steps}steps")
        self.run_id = run.info.run_id
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.model_dump()).items()})
        from pipelines.data.mlflow_input import log_dataset_input

        log_dataset_input(paths)  # the run's Dataset inputs show exactly which rows it saw

    def step(
        self, step: int, metrics: dict[str, float], rows: list[dict[str, Any]], texts: list[str], rewards: torch.Tensor
    ) -> None:
        if not self.enabled:
            return
        import mlflow

        mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)}, step=step)
        if self.samples:
            n = min(self.samples, len(texts))
            with _no_artifact_progress_bar():
                mlflow.log_table(
                    {
                        "step": [step] * n,
                        "prompt": [_last_user_turn(rows[i // self.group]["prompt"]) for i in range(n)],
                        "completion": texts[:n],
                        "reward": [float(r) for r in rewards[:n]],
                    },
                    artifact_file="completions.json",
                )

    def metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics outside a training step's (validation's), at `step`."""
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)}, step=step)

    def tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags(tags)

    def fail(self, interrupted: bool) -> None:
        if self.enabled:
            import mlflow

            mlflow.end_run(status="KILLED" if interrupted else "FAILED")

    def finish(self, curves: Path | None) -> None:
        if not self.enabled:
            return
        import mlflow

        if curves is not None:
            mlflow.log_artifact(str(curves), "plots")
        mlflow.end_run()


def _last_user_turn(prompt: Any) -> str:
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt)


@contextmanager
def _no_artifact_progress_bar() -> Iterator[None]:
    """MLflow's artifact progress bar off for one call, unless the user set it.

    `log_table` appends to the run's table by downloading it first, and MLflow draws a
    "Downloading artifacts" bar for that at every step, between the lines of the training bar.
    """
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)
