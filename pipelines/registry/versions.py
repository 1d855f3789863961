"""Registered models and their versions, made in one place for `grpo register` (stage.py) and
`grpo promote --checkpoint` (checkpoints.py).

A policy version is made from a LoggedModel (`models:/<model_id>`), and the logged model lists its
versions back, as mlflow.register_model records them (the UI links both ways). The reference a policy
trained on is its own registered model, `<name>-reference`, one version per sha256.

A create can reach the server and lose its answer (a timeout): each one here looks for what it may
have made before it gives up, so that a retry finishes that model or version instead of making another.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

POLICY_DESCRIPTION = "GRPO-trained LoRA adapters (peft format + MLflow pyfunc); base model in the -reference model."
REFERENCE_DESCRIPTION = "Pinned reference (base) models for the GRPO policies."


def reference_name(model_name: str) -> str:
    return f"{model_name}-reference"


def ensure_registered_model(client: Any, name: str, description: str) -> None:
    """`name` exists in the registry afterwards, also when the answer to its create was lost."""
    import mlflow

    try:
        client.get_registered_model(name)
        return
    except mlflow.exceptions.MlflowException:
        pass
    try:
        client.create_registered_model(name, description=description)
    except Exception as exc:
        try:
            client.get_registered_model(name)  # made after all: the answer was lost
        except mlflow.exceptions.MlflowException:
            raise exc from None


def create_version(
    client: Any,
    name: str,
    model: Any,
    run_id: str,
    tags: dict[str, str],
    description: str,
    made: Callable[[], Any | None] | None = None,
) -> Any | None:
    """Version `model` (a LoggedModel) as policy model `name` (registered first if need be); the new version.

    When the create fails, `made` looks for the version it may have made before its answer was lost: what it
    finds is returned, and with nothing found (or no `made`) the error is raised.
    """
    ensure_registered_model(client, name, POLICY_DESCRIPTION)
    try:
        return client.create_model_version(
            name,
            source=f"models:/{model.model_id}",
            run_id=run_id,
            tags=tags,
            description=description,
            model_id=model.model_id,
        )
    except Exception:
        found = made() if made is not None else None
        if found is None:
            raise
        return found


def list_version(client: Any, name: str, version: Any) -> None:
    """Add the version to its logged model's `mlflow.modelVersions`, as mlflow.register_model does (the UI
    links both ways); a no-op when listed already (a registration finished by a rerun)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    source = str(version.source or "")
    if not source.startswith("models:/m-"):
        return  # registered from a run's artifact, before versions were made from logged models
    model_id = source.removeprefix("models:/")
    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    entry = {"name": name, "version": str(version.version)}
    if entry not in listed:
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, entry])})


def ensure_reference(client: Any, name: str, folder: Path, sha256: str) -> str:
    """The registry version holding this exact reference (logged once per sha256)."""
    import mlflow

    ensure_registered_model(client, name, REFERENCE_DESCRIPTION)
    found = _reference_version(client, name, sha256)
    if found is not None:
        return found
    with mlflow.start_run(run_name=f"reference-{sha256[:12]}", nested=mlflow.active_run() is not None) as run:
        mlflow.log_artifacts(str(folder), "reference")
        mlflow.set_tag("reference_sha256", sha256)
    try:
        made = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/reference", run_id=run.info.run_id, tags={"sha256": sha256}
        )
    except Exception:
        # As for a policy's version: a create whose answer was lost (a timeout) may have happened.
        found = _reference_version(client, name, sha256)
        if found is None:
            raise
        return found
    return made.version


def _reference_version(client: Any, name: str, sha256: str) -> str | None:
    versions = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get("sha256") == sha256]
    return str(min(int(v.version) for v in versions)) if versions else None
