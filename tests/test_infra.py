"""The production stack (infra/): its files, and the smoke pipeline against the real programs on loopback.

The quick tests check the compose file, the secrets and the Kubernetes files. The ones marked
`infra` start what docker-compose.yml runs, with the same scripts, on 127.0.0.1: PostgreSQL
(Debian's, a throwaway cluster), the Prefect server on it, the MLflow server on it with basic auth,
allowed hosts and artifacts on S3 (moto's server standing in for MinIO), and run
`grpo run --preset smoke` against them with a DVC remote on the same S3. `make test-infra`
installs what they need and runs them; `make test` leaves them out.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, cli_env, make_project

INFRA = REPO / "infra"
SECRET_KEY = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|ROOT_USER")  # environment names that hold secrets


def _compose_command() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run([*command, "version"], capture_output=True).returncode == 0:
            return command
    return None


def test_compose_file_validates():
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed here")
    compose_file = ["-f", str(INFRA / "docker-compose.yml")]
    done = subprocess.run(
        [*command, "--env-file", str(INFRA / ".env.example"), *compose_file, "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    # Without the secrets, compose refuses and names the missing one.
    bare = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    refused = subprocess.run(
        [*command, *compose_file, "config", "--quiet"],
        capture_output=True,
        text=True,
        env=bare,
        cwd=tempfile.gettempdir(),
    )
    assert refused.returncode != 0 and "infra/.env" in refused.stderr, refused.stderr


def test_every_secret_comes_from_the_environment():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    assert {"postgres", "minio", "prefect-server", "mlflow", "worker"} <= set(compose["services"])
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_KEY.search(key) or ("://" in str(value) and "@" in str(value)):
                assert "${" in str(value), f"{name}.{key} must come from the environment, not the file"
                assert ":?" in str(value), f"{name}.{key}: a missing secret must stop compose (${{VAR:?message}})"
    example = dict(
        line.split("=", 1)
        for line in (INFRA / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for key, value in example.items():
        if re.search(r"PASSWORD|AUTH_STRING|SECRET_KEY", key):
            assert "CHANGE_ME" in value, f".env.example holds a real-looking {key}"
    assert ".env" in (INFRA / ".gitignore").read_text().split()


def test_security_settings_are_on():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    mlflow_env = compose["services"]["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    entrypoint = (INFRA / "mlflow" / "entrypoint.sh").read_text()
    assert (
        "--allowed-hosts" in entrypoint and "--app-name basic-auth" in entrypoint and "--serve-artifacts" in entrypoint
    )
    assert compose["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )
    assert "PREFECT_SERVER_API_AUTH_STRING" in compose["services"]["prefect-server"]["environment"]
    for script in ("up.sh", "mlflow/entrypoint.sh", "postgres/init-databases.sh"):
        assert subprocess.run(["sh", "-n", str(INFRA / script)]).returncode == 0, script


def test_kubernetes_pool_requests_gpus_and_declares_its_variables():
    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    used = set(re.findall(r"{{ (\w+) }}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"]), used - set(template["variables"]["properties"])
    for name in ("base.yaml", "worker-values.yaml", "server-values.yaml"):
        assert all(doc for doc in yaml.safe_load_all((INFRA / "k8s" / name).read_text())), name
    values = yaml.safe_load((INFRA / "k8s" / "worker-values.yaml").read_text())
    assert values["worker"]["config"] == {**values["worker"]["config"], "workPool": "grpo-k8s", "type": "kubernetes"}


# --- real servers on loopback -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers: up
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Postgres:
    port: int
    socket_dir: str
    passwords: dict[str, str]

    def url(self, user: str, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/{database}"

    def query(self, database: str, sql: str) -> str:
        env = {**os.environ, "PGHOST": self.socket_dir, "PGPORT": str(self.port)}
        done = subprocess.run(
            ["psql", "-U", "postgres", "-d", database, "-tAc", sql], env=env, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()


def _postgres_bin() -> Path:
    found = [Path(p).parent for p in sorted(glob("/usr/lib/postgresql/*/bin/initdb"))]
    if shutil.which("initdb"):
        found.append(Path(shutil.which("initdb")).resolve().parent)
    if not found or not shutil.which("psql"):
        pytest.skip("PostgreSQL is not installed: `make test-infra` installs it (apt-get install -y postgresql)")
    return found[-1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway cluster on 127.0.0.1, its databases made by infra/postgres/init-databases.sh."""
    bindir = _postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="grpo-pg-"))  # not under pytest's root-only tmp: postgres must reach it
    owner: dict[str, str] = {"cwd": str(folder)}
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to the `postgres` account
        shutil.chown(folder, "postgres", "postgres")
        owner |= {"user": "postgres", "group": "postgres"}
    data, port = folder / "data", _free_port()
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256"],
        check=True,
        capture_output=True,
        **owner,
    )
    options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off"
    # No pipes: the server would inherit them and keep this call waiting; its output goes to the log.
    started = subprocess.run(
        [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-o", options, "-w", "start"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **owner,
    )
    if started.returncode != 0:
        raise RuntimeError(f"PostgreSQL did not start:\n{(folder / 'log').read_text()[-3000:]}")
    try:
        server = Postgres(port, str(folder), {"prefect": secrets.token_hex(12), "mlflow": secrets.token_hex(12)})
        env = {
            **os.environ,
            "PGHOST": str(folder),
            "PGPORT": str(port),
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "postgres",
            "PREFECT_DB_PASSWORD": server.passwords["prefect"],
            "MLFLOW_DB_PASSWORD": server.passwords["mlflow"],
        }
        subprocess.run(["sh", str(INFRA / "postgres" / "init-databases.sh")], env=env, check=True, capture_output=True)
        yield server
    finally:
        subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True, **owner
        )
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class S3:
    url: str
    env: dict[str, str]

    def keys(self, bucket: str) -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.url, **_aws_kwargs(self.env))
        return [
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])
        ]


def _aws_kwargs(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3]:
    """moto's S3 server on 127.0.0.1 (what MinIO is in the compose stack), with the two buckets."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed: `make test-infra` installs it")
    boto3 = pytest.importorskip("boto3")
    folder, port = tmp_path_factory.mktemp("s3"), _free_port()
    log = folder / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url, proc, log)
        env = {
            "AWS_ACCESS_KEY_ID": "grpo-test",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(12),
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        client = boto3.client("s3", endpoint_url=url, **_aws_kwargs(env))
        for bucket in ("mlflow-artifacts", "dvc"):
            client.create_bucket(Bucket=bucket)
        yield S3(url, env)
    finally:
        _stop(proc)


@dataclass
class Service:
    url: str
    env: dict[str, str]  # what a client needs to reach it


@pytest.fixture(scope="module")
def prefect_server(postgres, tmp_path_factory) -> Iterator[Service]:
    """`prefect server start` on the Postgres database, with basic auth, as in docker-compose.yml."""
    folder, port = tmp_path_factory.mktemp("prefect"), _free_port()
    auth = f"admin:{secrets.token_hex(12)}"
    env = {
        **cli_env(),
        "PREFECT_HOME": str(folder),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url("prefect", "prefect", "postgresql+asyncpg"),
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = folder / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/api"
        _wait_http(f"{url}/health", proc, log)
        yield Service(url, {"PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": auth})
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def mlflow_server(postgres, s3, tmp_path_factory) -> Iterator[Service]:
    """infra/mlflow/entrypoint.sh as compose runs it: Postgres, S3 artifacts, allowed hosts, basic auth."""
    pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed: `make test-infra` installs it")
    pytest.importorskip(
        "flask_wtf", reason="Flask-WTF (mlflow basic auth) is not installed: `make test-infra` installs it"
    )
    folder, port = tmp_path_factory.mktemp("mlflow"), _free_port()
    password = secrets.token_hex(12)
    env = {
        **cli_env(),
        **s3.env,
        "MLFLOW_S3_ENDPOINT_URL": s3.url,
        "MLFLOW_BACKEND_STORE_URI": postgres.url("mlflow", "mlflow", "postgresql+psycopg2"),
        "MLFLOW_AUTH_DATABASE_URI": postgres.url("mlflow", "mlflow_auth", "postgresql+psycopg2"),
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow-artifacts/",
        "MLFLOW_ALLOWED_HOSTS": f"127.0.0.1:{port}",
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth" / "basic_auth.ini"),
    }
    log = folder / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["sh", str(INFRA / "mlflow" / "entrypoint.sh")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/health", proc, log)
        yield Service(
            url, {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        )
    finally:
        _stop(proc)


def _status(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.infra
def test_servers_refuse_strangers(prefect_server, mlflow_server):
    search = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    login = base64.b64encode(f"admin:{mlflow_server.env['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()
    assert _status(search, {"Authorization": f"Basic {login}"}) == 200
    assert _status(search) == 401  # basic auth
    assert _status(search, {"Authorization": f"Basic {login}", "Host": "evil.example"}) == 403  # --allowed-hosts
    flows = f"{prefect_server.url}/flows/filter"
    assert _status(flows, {"Content-Type": "application/json"}, b"{}") == 401
    token = base64.b64encode(prefect_server.env["PREFECT_API_AUTH_STRING"].encode()).decode()
    assert _status(flows, {"Content-Type": "application/json", "Authorization": f"Basic {token}"}, b"{}") == 200


@pytest.mark.infra
@pytest.mark.timeout(900)
def test_smoke_pipeline_against_the_stack(tmp_path, postgres, s3, prefect_server, mlflow_server):
    """`grpo run --preset smoke` with only environment and DVC config changed: everything lands on the servers."""
    pytest.importorskip("dvc_s3", reason="dvc-s3 is not installed: `make test-infra` installs it")
    root = make_project(tmp_path / "project", dvc=True)
    env = {**cli_env(), **s3.env, **prefect_server.env, **mlflow_server.env}

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    dvc = [sys.executable, "-m", "dvc"]
    run(*dvc, "remote", "add", "--default", "stack", "s3://dvc/grpo")
    run(*dvc, "remote", "modify", "stack", "endpointurl", s3.url)
    out = run(sys.executable, "-m", "flows.cli", "run", "--preset", "smoke")
    results = json.loads(out.stdout[out.stdout.index("{") :])
    assert results["register"]["promoted"] and results["register"]["version"] == "1"

    # MLflow: runs and registry in Postgres, artifacts in S3, nothing local.
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()
    assert int(postgres.query("mlflow", "select count(*) from runs")) >= 1
    assert postgres.query("mlflow", "select alias from registered_model_aliases where alias = 'champion'") == "champion"
    assert any(k.endswith("adapter_model.safetensors") for k in s3.keys("mlflow-artifacts"))

    # Prefect: the flow run, completed, in Postgres.
    states = postgres.query("prefect", "select state_type from flow_run").split()
    assert "COMPLETED" in states, states

    # DVC: every out pushed to the S3 remote.
    assert json.loads(run(*dvc, "status", "--cloud", "--json").stdout) == {}
    assert s3.keys("dvc")
