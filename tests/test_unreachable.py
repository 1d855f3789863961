"""A server that is down: every command that needs it says so in one line within seconds (issue
"Hardening", item 4). The server is a closed loopback port: bound, then closed, so nothing listens."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import mlflow_store
from tests.conftest import cli_env, make_project

GRPO = [sys.executable, "-m", "flows.cli"]
LIMIT_S = 15


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("unreachable") / "project")


def _grpo(root: Path, env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([*GRPO, *args], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - started


def _env(**extra: str) -> dict[str, str]:
    env = {**cli_env(), **extra}
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", *mlflow_store.HTTP_SETTINGS):
        if name not in extra:
            env.pop(name, None)
    return env


@pytest.mark.parametrize(
    "args",
    [
        ["models"],
        ["promote", "1", "--reason", "test"],
        ["rollback"],
        ["ask", "What is 1 + 1?"],
        ["register"],
        ["evaluate"],  # evaluate.champion is true: checked before anything is scored
        ["train"],
        ["run"],
    ],
    ids=lambda args: args[0],
)
def test_a_closed_mlflow_port_fails_in_one_line_within_seconds(root, args):
    uri = f"http://127.0.0.1:{_closed_port()}"
    proc, took = _grpo(root, _env(MLFLOW_TRACKING_URI=uri), *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and took < LIMIT_S, (took, proc.stderr[-3000:])
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0] == (
        f"grpo {args[0]}: error: cannot reach the MLflow server at {uri} ([Errno 111] Connection refused): "
        "start it or fix MLFLOW_TRACKING_URI"
    )


@pytest.mark.parametrize("command", ["run", "serve"])
def test_a_closed_prefect_port_fails_in_one_line_within_seconds(root, tmp_path, command):
    url = f"http://127.0.0.1:{_closed_port()}/api"
    proc, took = _grpo(root, _env(PREFECT_API_URL=url, PREFECT_HOME=str(tmp_path / "prefect-home")), command)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and took < LIMIT_S and len(lines) == 1, (took, proc.stderr[-3000:])
    assert lines[0].startswith(f"grpo {command}: error: cannot reach the Prefect server at {url} (")
    assert lines[0].endswith("start it (`prefect server start`) or fix PREFECT_API_URL")


def test_a_server_lost_after_the_check_still_fails_in_one_line(root, monkeypatch, capsys):
    """Past the up-front check, MLflow's own retries are bounded and the error is still one line."""
    from flows.cli import main

    for name in mlflow_store.HTTP_SETTINGS:  # main() sets them; put them back afterwards
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow_store, "check_reachable", lambda *a, **k: None)
    started = time.monotonic()
    code = main(["models", "--project", str(root)])
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 1 and took < LIMIT_S and err.count("\n") == 1, (took, err)
    assert err.startswith(f"grpo models: error: cannot reach the MLflow server at {uri} (") and "Traceback" not in err
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # main() bounded the retries


def test_the_users_own_http_settings_win(monkeypatch):
    for name in mlflow_store.HTTP_SETTINGS:
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    mlflow_store.bound_http_waits()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"


def test_local_stores_need_no_server(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow_store.check_reachable(tmp_path)  # sqlite beside params.yaml: nothing to reach
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    mlflow_store.check_reachable(tmp_path)


def test_connection_failures_are_told_from_other_errors():
    import requests

    with pytest.raises(requests.ConnectionError) as refused:
        requests.get(f"http://127.0.0.1:{_closed_port()}/health", timeout=5)
    assert mlflow_store.connection_failure(refused.value) == "[Errno 111] Connection refused"
    wrapped = RuntimeError("registration failed")
    wrapped.__cause__ = refused.value
    assert mlflow_store.connection_failure(wrapped) == "[Errno 111] Connection refused"
    assert mlflow_store.connection_failure(TimeoutError()) == "TimeoutError"
    # A reward function that "timed out" is not a server that cannot be reached.
    assert mlflow_store.connection_failure(RuntimeError("reward `accuracy` timed out after 30 s")) is None


def test_data_add_with_a_closed_prefect_port_says_so_in_one_line(tmp_path, monkeypatch):
    from pipelines.data import events

    url = f"http://127.0.0.1:{_closed_port()}/api"
    monkeypatch.setattr(events, "api_url", lambda: url)  # Prefect caches its settings within a process
    started = time.monotonic()
    sent = events.emit_dataset_updated(tmp_path, "data/raw/new.jsonl", "ab" * 32)
    assert not sent.sent and time.monotonic() - started < LIMIT_S
    assert sent.message.startswith(f"grpo.dataset.updated not sent to {url} ([Errno 111] Connection refused)")


def test_register_retries_say_whether_they_retry(caplog):
    """The retries `grpo run` keeps for a transient error are logged, and a lasting error is not retried."""
    from prefect.states import Failed

    from tasks.retry import SERVER_RETRIES, transient

    assert SERVER_RETRIES["retries"] == 3  # bounded: 2 + 4 + 8 s of waiting at most
    with caplog.at_level("INFO", logger="grpo.retry"):
        assert transient(None, None, Failed(data=ConnectionRefusedError(111, "Connection refused")))
        assert not transient(None, None, Failed(data=ValueError("champion is v2 but metrics/eval.json scored v1")))
    messages = [r.getMessage() for r in caplog.records if r.name == "grpo.retry"]
    assert messages == [
        "task: transient error, retrying while retries remain: [Errno 111] Connection refused",
        "task: lasting error, not retried: champion is v2 but metrics/eval.json scored v1",
    ]


@pytest.mark.parametrize("args", [["models"], ["register"], ["train"]], ids=lambda args: args[0])
def test_credentials_in_the_tracking_uri_are_never_printed(root, args):
    port = _closed_port()
    proc, _ = _grpo(root, _env(MLFLOW_TRACKING_URI=f"http://admin:s3cret-pw@127.0.0.1:{port}"), *args)
    assert proc.returncode == 1 and "s3cret-pw" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert f"http://***@127.0.0.1:{port}" in proc.stderr


def test_redact_strips_every_urls_userinfo():
    assert mlflow_store.redact("a https://u:p@h/x b http://tok@h2 c sqlite:///m.db") == (
        "a https://***@h/x b http://***@h2 c sqlite:///m.db"
    )
