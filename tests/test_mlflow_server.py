"""Registration, promotion and rollback against a real `mlflow server` on loopback.

The server keeps runs and the registry in SQLite and proxies artifacts into a folder
(`--serve-artifacts --artifacts-destination`), so the client writes and reads artifacts only over
HTTP, as it would with Postgres + S3 behind the server (infra/README.md). The code under test is
unchanged: only MLFLOW_TRACKING_URI differs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines import mlflow_store
from pipelines.registry import promotion
from pipelines.registry import stage as registry
from tests.conftest import cli_env, download_version
from tests.test_registry import BETTER, NAME, WORSE, build_project, fake_evaluation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class Server:
    url: str
    folder: Path
    proc: subprocess.Popen

    def wait_healthy(self, timeout: float = 120.0) -> str:
        """The URL, once /health answers (12-26 s after the start on the project's machine)."""
        deadline = time.monotonic() + timeout
        while not _healthy(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not become healthy:\n{(self.folder / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        return self.url


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:<free port>, started (not yet waited for); stopped afterwards."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    with (folder / "server.log").open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                f"sqlite:///{folder / 'mlflow.db'}",
                "--serve-artifacts",
                "--artifacts-destination",
                str(folder / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=cli_env(),
            start_new_session=True,  # its own process group: stopping it stops its uvicorn worker too
        )
    try:
        yield Server(f"http://127.0.0.1:{port}", folder, proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)  # a throwaway store: no need to wait out uvicorn's graceful shutdown
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow  # (53 s; the same calls run against SQLite in test_registry.py, and `make test-infra` runs a server)
def test_register_promote_rollback_against_a_server(mlflow_server, tmp_path, tiny_reference, monkeypatch):
    import mlflow

    cfg, paths = build_project(tmp_path / "project", tiny_reference, export_check=True)  # while the server starts
    url, server_folder = mlflow_server.wait_healthy(), mlflow_server.folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    try:
        fake_evaluation(cfg, paths, BETTER, None, None)
        first = registry.run(cfg, paths)
        assert first.promoted and first.version == "1"
        assert client_tag(url, NAME, "1", "export_parity").startswith("pyfunc max")  # the probe reached the server
        assert not (paths.root / "mlflow.db").exists() and not (paths.root / "mlartifacts").exists()

        client = mlflow_store.registry_client(paths.root)
        fake_evaluation(cfg, paths, WORSE, BETTER, "1")
        assert not registry.run(cfg, paths).promoted  # degraded: kept
        fake_evaluation(cfg, paths, BETTER, WORSE, "1")
        third = registry.run(cfg, paths)
        assert third.promoted and str(client.get_model_version_by_alias(NAME, "champion").version) == "3"

        done = promotion.rollback(client, NAME, "smoke test", user="ci")
        assert done == {"name": NAME, "champion": "1", "rolled_back": "3", "by": "ci", "reason": "smoke test"}
        assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
        promotion.promote(client, NAME, "2", "manual check", user="ci")
        assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
        assert client.get_model_version(NAME, "2").tags["previous_champion"] == "1"

        # Artifacts travelled through the server into its artifacts folder, and come back from it.
        assert list((server_folder / "artifacts").rglob("adapter_model.safetensors"))
        base, adapter = download_version(NAME, "champion", tmp_path / "dl")
        assert (adapter / "adapter_config.json").exists() and (adapter / "MLmodel").exists()
        assert (
            json.loads((base / "manifest.json").read_text())["sha256"]
            == client.get_model_version(NAME, "2").tags["reference_sha256"]
        )
    finally:
        mlflow.set_tracking_uri(None)


def client_tag(url: str, name: str, version: str, key: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url).get_model_version(name, version).tags.get(key, "")


class _SlowCreateProxy:
    """A loopback HTTP proxy before the server that answers a model-version create only after
    `delay` seconds: the server has made the version, the client has given up waiting."""

    CREATE = "/api/2.0/mlflow/model-versions/create"

    def __init__(self, upstream: str, delay: float) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        host, port = urlsplit(upstream).hostname, urlsplit(upstream).port
        proxy = self
        self.creates: list[str] = []  # the model name of each create that reached the server

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(host, port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                if self.path.startswith(proxy.CREATE) and self.command == "POST":
                    proxy.creates.append(json.loads(body)["name"])
                    time.sleep(delay)  # made upstream; the answer comes too late
                try:
                    self.send_response(answer.status)
                    for key, value in answer.getheaders():
                        if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped waiting

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_slow_registry_gives_one_decided_version_not_a_duplicate(
    mlflow_server, tmp_path, tiny_reference, monkeypatch
):
    """The create's answer is lost behind a slow proxy (a real server): the version is found and finished."""
    import mlflow
    from mlflow import MlflowClient

    name = "grpo-policy-slow"
    cfg, paths = build_project(tmp_path / "project", tiny_reference)
    cfg.registry.model_name = name  # the module's server already holds the other test's versions
    proxy = _SlowCreateProxy(mlflow_server.wait_healthy(), delay=4.0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")  # the client gives up before the answer comes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        fake_evaluation(cfg, paths, BETTER, None, None)
        done = registry.run(cfg, paths)
        client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
        versions = client.search_model_versions(f"name='{name}'")
        assert [str(v.version) for v in versions] == ["1"] and done.version == "1"
        # a create that may have succeeded is never sent again: one for the policy, one for its base
        assert sorted(proxy.creates) == [name, f"{name}-reference"]
        assert versions[0].tags["promotion_decision"] == "promoted" and done.promoted
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    finally:
        proxy.close()
        mlflow.set_tracking_uri(None)
