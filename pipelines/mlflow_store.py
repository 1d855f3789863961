"""The MLflow store, as evaluation and registry both reach it: tracking URI, experiment, registry client.

The store is MLFLOW_TRACKING_URI when set, else local SQLite beside params.yaml.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


# The aliases the pipeline moves (registry/promotion.py); evaluation looks `champion` up to re-score it.
CHAMPION = "champion"
CHALLENGER = "challenger"

# MlflowException codes that mean "no such model, version or alias".
_ABSENT = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


class StoreError(RuntimeError):
    """The MLflow store cannot answer what was asked; the message says what to do."""


def store_exists(root: Path) -> bool:
    """False when the default SQLite store was never created (nothing can be registered there yet)."""
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).exists()
    return True


def registry_client(root: Path) -> Any:
    """An MlflowClient on the project's store; a StoreError when the local store does not exist."""
    import mlflow
    from mlflow import MlflowClient

    if not store_exists(root):
        raise StoreError(
            f"no model registry at {tracking_uri(root)}: run `grpo register` first, or set MLFLOW_TRACKING_URI to "
            "your server"
        )
    mlflow.set_tracking_uri(tracking_uri(root))  # models:/ downloads resolve through the global URI
    return MlflowClient()


def is_absent(exc: Exception) -> bool:
    """True for the MlflowException that means "no such model, version or alias"."""
    return getattr(exc, "error_code", None) in _ABSENT


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The model version holding `alias`, or None when there is none (or no such model yet)."""
    import mlflow

    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        if is_absent(exc):
            return None
        raise


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
