"""MLflow set-up: the tracking store from MLFLOW_TRACKING_URI, else local SQLite beside params.yaml."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def setup(root: Path, experiment: str) -> str:
    """Point MLflow at the project's store and return the experiment id (created if needed).

    With the default SQLite store, artifacts go to <project>/mlartifacts, not ./mlruns of
    whatever folder the command ran in.
    """
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        location = (root / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}, for MLflow params and the params hash."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
