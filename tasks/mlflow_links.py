"""Links from the Prefect artifacts to the MLflow UI: a run's page and a registered version's page."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

# The MLflow UI's address where it is not the tracking URI (a UI behind a proxy, or `mlflow ui` on
# another port for the SQLite store), e.g. https://mlflow.example.org or http://127.0.0.1:5001.
MLFLOW_UI_URL = "MLFLOW_UI_URL"


def run_link(root: Path, run_id: str) -> str:
    """The run's page in the MLflow UI (tracking store read for its experiment); the bare id when unreadable."""
    from pipelines.mlflow_store import tracking_uri

    try:
        from mlflow import MlflowClient

        experiment_id = MlflowClient(tracking_uri(root)).get_run(run_id).info.experiment_id
    except Exception:  # the link is a courtesy: a store that cannot be read leaves the bare run id
        return f"`{run_id}`"
    return _link(root, run_id, f"#/experiments/{experiment_id}/runs/{run_id}")


def version_link(root: Path, name: str, version: str) -> str:
    """The registered version's page in the MLflow UI."""
    return _link(root, f"{name} v{version}", f"#/models/{quote(name, safe='')}/versions/{version}")


def _link(root: Path, text: str, page: str) -> str:
    """`page` at MLFLOW_UI_URL when set, else at the tracking server's own address; for a local store
    (SQLite), at `mlflow ui`'s default address, with the command that starts it."""
    from pipelines.mlflow_store import redact, tracking_uri

    uri = tracking_uri(root)
    if ui := os.environ.get(MLFLOW_UI_URL, "").strip():
        return f"[{text}]({ui.rstrip('/')}/{page})"
    if uri.startswith(("http://", "https://")):
        return f"[{text}]({redact(uri).rstrip('/').replace('***@', '')}/{page})"  # never a password in the UI
    return (
        f"[{text}](http://127.0.0.1:5000/{page}) (after `mlflow ui --backend-store-uri {uri}`; set "
        f"{MLFLOW_UI_URL} for another address)"
    )
