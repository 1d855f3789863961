"""What training leaves behind in JSON: reports/train.json, everything, for the register stage, the Prefect
artifact and people; metrics/train.json, the few figures `dvc metrics show` and `dvc metrics diff` compare."""

from __future__ import annotations

from typing import Any

from pipelines.io import write_json
from pipelines.paths import Paths


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The final step's reward and KL, how many steps ran, which one was selected and its validation accuracy.

    >>> headline({"reward": 0.5, "kl": 0.01, "steps": 30, "selected_step": 20, "loss": 0.1,
    ...           "validation": {"best_step": 20, "best_accuracy": 0.4, "last_step": 30, "last_accuracy": 0.3}})
    {'reward': 0.5, 'kl': 0.01, 'steps': 30, 'selected_step': 20, 'val_accuracy': 0.4}
    """
    figures = {key: summary[key] for key in ("reward", "kl", "steps", "selected_step") if key in summary}
    validation = summary.get("validation") or {}
    for which in ("selected", "best", "last"):  # selected_* is absent from summaries written before it was kept
        if validation.get(f"{which}_step") is not None and validation.get(f"{which}_step") == summary.get(
            "selected_step"
        ):
            figures["val_accuracy"] = validation[f"{which}_accuracy"]
            break
    return figures


def write(paths: Paths, summary: dict[str, Any]) -> None:
    """reports/train.json (the whole summary) and metrics/train.json (its headline figures)."""
    write_json(paths.train_summary, summary)
    write_json(paths.train_metrics, headline(summary))
