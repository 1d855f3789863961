"""The MLflow store, as evaluation and registry both reach it: tracking URI, experiment, registry client.

The store is MLFLOW_TRACKING_URI when set, else local SQLite beside params.yaml.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


# MLflow's HTTP client, left to its defaults, retries a refused connection 7 times with backoff
# (about 4 minutes) and waits up to 120 s for each answer: a command would sit silent that long
# before saying the server is down. For `grpo` commands: 2 retries (about 3 s in all) and 20 s per
# answer. Transient trouble during a long run is retried again, with logging, by tasks/retry.py.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
# How long the up-front check waits for the server to answer at all.
REACH_TIMEOUT_S = 5.0


def bound_http_waits() -> None:
    """Set HTTP_SETTINGS in the environment where the user has not set them (their own setting wins).

    MLflow reads them at each request, and child processes (torchrun ranks, served flow runs) inherit them.
    """
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


# The aliases the pipeline moves (registry/promotion.py); evaluation looks `champion` up to re-score it.
CHAMPION = "champion"
CHALLENGER = "challenger"

# MlflowException codes that mean "no such model, version or alias".
_ABSENT = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


class StoreError(RuntimeError):
    """The MLflow store cannot answer what was asked; the message says what to do."""


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it (`scheme://user:password@host`) replaced by `***`.

    >>> redact("cannot reach http://admin:s3cret@mlflow:5000/api (refused); sqlite:///x.db")
    'cannot reach http://***@mlflow:5000/api (refused); sqlite:///x.db'
    """
    return _USERINFO.sub("***@", text)


def unreachable(uri: str, reason: str) -> str:
    """The one line a command prints when the tracking server does not answer."""
    return redact(f"cannot reach the MLflow server at {uri} ({reason}): start it or fix MLFLOW_TRACKING_URI")


def check_reachable(root: Path, timeout: float = REACH_TIMEOUT_S) -> None:
    """A StoreError, within `timeout` seconds, when the tracking URI is a server that does not answer.

    Any HTTP answer counts as reachable (a proxy that does not route /health still answers),
    except a gateway's 502/503/504, which says the server behind it is down. Local stores pass.
    """
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        check_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout, allow_redirects=False)
    except requests.Timeout:
        raise StoreError(unreachable(uri, f"no answer within {timeout:g} s")) from None
    except requests.RequestException as exc:
        raise StoreError(unreachable(uri, connection_failure(exc) or type(exc).__name__)) from None
    if response.status_code in (502, 503, 504):
        raise StoreError(unreachable(uri, f"HTTP {response.status_code} {response.reason}".strip()))


# What MLflow's client (requests/urllib3) says when it cannot talk to the server at all.
_CONNECTION_FAILURES = (
    "connection refused",
    "failed to establish a new connection",
    "max retries exceeded",
    "name or service not known",
    "temporary failure in name resolution",
    "no route to host",
    "network is unreachable",
    "connection reset",
    "connection aborted",
    "remote end closed connection",
    "read timed out",
    "connect timeout",
    "timed out",
)


def connection_failure(exc: BaseException) -> str | None:
    """A short reason ("[Errno 111] Connection refused") when `exc`, or what caused it, is a failure to
    reach a server through an HTTP client (MLflow's or Prefect's); None for any other error.

    >>> connection_failure(ConnectionRefusedError(111, "Connection refused"))
    '[Errno 111] Connection refused'
    >>> connection_failure(ValueError("no such model")) is None
    True
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for link in chain:
        if isinstance(link, (ConnectionError, TimeoutError)) and not isinstance(link, BrokenPipeError):
            return _short_reason(str(link)) or type(link).__name__
    if not any(type(link).__module__.startswith(_HTTP_MODULES) for link in chain):
        return None
    text = " ".join(f"{type(link).__name__}: {link}" for link in chain).lower()
    if not any(fragment in text for fragment in _CONNECTION_FAILURES):
        return None
    if "timed out" in text or "timeout" in text:
        return "no answer in time"
    return _short_reason(" ".join(str(link) for link in chain)) or "connection failed"


# Where the errors of HTTP clients come from: MLflow's (requests, urllib3) and Prefect's (httpx).
_HTTP_MODULES = ("requests", "urllib3", "mlflow", "http.client", "httpx", "httpcore")


def _short_reason(text: str) -> str:
    """`[Errno 111] Connection refused` out of urllib3's long sentences; else the first line, cut short."""
    found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if found:
        return found.group(0).strip().rstrip(".")
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:200]


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
            f"no model registry at {redact(tracking_uri(root))}: run `grpo register` first, or set "
            "MLFLOW_TRACKING_URI to your server"
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


# MLflow 3's experiment-kind tag, as its UI's kind selector writes it ("Machine learning", not "GenAI apps
# & agents"): training runs with metrics and models, not traces. Set when missing; a kind chosen in the UI
# stays. MLflow 3.17's UI itself picks its view from the sidebar's switch (docs/outputs.md).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def check_sqlite_store(path: Path) -> None:
    """A StoreError naming the file when a SQLite tracking store exists but is no database: empty
    (0 bytes, which MLflow would silently take as an empty registry), another kind of file, or
    damaged where SQLite first reads it. A missing file is fine: MLflow creates it."""
    import sqlite3

    if not path.exists():
        return
    fix = "move it aside (MLflow creates a new, empty store) or restore it from a backup"
    if path.stat().st_size == 0:
        raise StoreError(f"{path} is empty (0 bytes), not an MLflow store: {fix}")
    with path.open("rb") as fh:
        header = fh.read(16)
    if header != b"SQLite format 3\x00":
        raise StoreError(f"{path} is not a SQLite database (it starts with {header[:8]!r}): {fix}")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            db.execute("PRAGMA schema_version").fetchone()
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc):
            return  # busy, not broken: the command's own retries handle it
        raise StoreError(f"{path} is a damaged SQLite database ({exc}): {fix}") from None


def setup(root: Path, experiment: str) -> str:
    """Point MLflow at the project's store and return the experiment id (created if needed).

    With the default SQLite store, artifacts go to <project>/mlartifacts, not ./mlruns of
    whatever folder the command ran in.
    """
    import mlflow

    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        check_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
        if EXPERIMENT_KIND_TAG not in found.tags:
            try:
                mlflow.MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            except mlflow.exceptions.MlflowException:
                pass  # a user who may log runs but not edit the experiment (an auth server): the tag is a courtesy
    else:
        location = (root / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        experiment_id = mlflow.create_experiment(
            experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
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
