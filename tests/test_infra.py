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
import importlib
import inspect
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
SECRET_KEY = re.compile(
    r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|API_KEY|ROOT_USER"
)  # environment names that hold secrets


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


def _pulled_images() -> dict[str, str]:
    """Each compose service's image that is pulled rather than built here, as it runs by default
    (`${VAR:-default}` read as the default)."""
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    return {
        name: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", service["image"])
        for name, service in compose["services"].items()
        if "image" in service and "build" not in service
    }


def test_images_are_pinned_to_release_tags():
    images = _pulled_images()
    assert {"secrets-check", "postgres", "minio", "buckets", "prefect-server"} <= set(images)
    for name, image in images.items():
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned to a release"
        assert "${" not in image, f"{name}: {image}"
    assert images["minio"].startswith("minio/minio:RELEASE.") and images["buckets"].startswith("minio/mc:RELEASE.")
    assert ":latest" not in (INFRA / "docker-compose.yml").read_text()
    # The images built here (mlflow, worker) start from tagged bases.
    for dockerfile in (INFRA / "Dockerfile", INFRA / "mlflow" / "Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("FROM "):
                image = line.split()[1]
                assert ":" in image and not image.endswith(":latest"), f"{dockerfile}: {line}"


def _refs(service: dict) -> set[str]:
    """The variables a service's environment is made of."""
    return {
        var for value in (service.get("environment") or {}).values() for var in re.findall(r"\$\{(\w+)", str(value))
    }


def test_each_service_gets_only_its_own_credentials():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    root_keys = {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    # MinIO's root keys: MinIO itself and the one-shot that makes the per-service users (and the
    # one-shot that refuses placeholders, which runs nothing else), nobody else.
    assert {n for n, s in services.items() if _refs(s) & root_keys} == {"minio", "buckets", "secrets-check"}
    # The MLflow admin password: the server, the one-shot that makes the worker's user, and the check.
    assert {n for n, s in services.items() if "MLFLOW_ADMIN_PASSWORD" in _refs(s)} == {
        "mlflow",
        "mlflow-users",
        "secrets-check",
    }
    worker, mlflow = services["worker"]["environment"], services["mlflow"]["environment"]
    assert not _refs(services["worker"]) & (root_keys | {"MLFLOW_ADMIN_PASSWORD", "MLFLOW_ADMIN_USER"})
    assert (
        "WORKER_S3_ACCESS_KEY" in worker["AWS_ACCESS_KEY_ID"]
        and "WORKER_S3_SECRET_KEY" in worker["AWS_SECRET_ACCESS_KEY"]
    )
    assert "MLFLOW_WORKER_USER" in worker["MLFLOW_TRACKING_USERNAME"]
    assert "MLFLOW_WORKER_PASSWORD" in worker["MLFLOW_TRACKING_PASSWORD"]
    assert (
        "MLFLOW_S3_ACCESS_KEY" in mlflow["AWS_ACCESS_KEY_ID"]
        and "MLFLOW_S3_SECRET_KEY" in mlflow["AWS_SECRET_ACCESS_KEY"]
    )
    assert services["worker"]["depends_on"]["mlflow-users"] == {"condition": "service_completed_successfully"}
    # The init script gives each of those users one policy: its own bucket, objects and listing only.
    init = (INFRA / "minio" / "init.sh").read_text()
    assert "mc admin user add" in init and "mc admin policy attach" in init and "s3:*" not in init
    assert re.findall(r'"Resource": \["([^"]+)"\]', init) == ["arn:aws:s3:::$2", "arn:aws:s3:::$2/*"]
    assert 'bucket_user grpo-dvc "$DVC_BUCKET" "$WORKER_S3_ACCESS_KEY"' in init
    assert 'bucket_user grpo-mlflow-artifacts "$MLFLOW_BUCKET" "$MLFLOW_S3_ACCESS_KEY"' in init
    assert services["buckets"]["volumes"] == ["./minio/init.sh:/usr/local/bin/minio-init.sh:ro"]
    # git in the image trusts the project's path only, not every repository on the machine.
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "safe.directory /workspace" in dockerfile and "safe.directory '*'" not in dockerfile
    assert "TLS" in (INFRA / "README.md").read_text()


def _secrets(compose: dict) -> set[str]:
    """Every variable the compose file requires (`${VAR:?message}`) that names a secret."""
    return {
        var
        for service in compose["services"].values()
        for value in (service.get("environment") or {}).values()
        for var in re.findall(r"\$\{(\w+):\?", str(value))
        if SECRET_KEY.search(var) and var != "MINIO_ROOT_USER" and not var.endswith("ACCESS_KEY")
    }


def test_placeholder_secrets_stop_the_stack(tmp_path):
    """A secret left as .env.example's CHANGE_ME (or empty) stops compose, up.sh and each service's own script."""
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    check = compose["services"]["secrets-check"]
    assert set(check["environment"]) == _secrets(compose)  # it sees every secret the stack uses
    for root in ("postgres", "minio"):  # everything else starts after one of these
        assert compose["services"][root]["depends_on"]["secrets-check"] == {
            "condition": "service_completed_successfully"
        }
    script = check["command"][0].replace("$$", "$")
    good = {"PATH": os.environ["PATH"], **{k: secrets.token_hex(8) for k in check["environment"]}}
    assert subprocess.run(["sh", "-c", script], env=good, capture_output=True).returncode == 0
    bad = {**good, "MLFLOW_WORKER_PASSWORD": "CHANGE_ME", "PREFECT_AUTH_STRING": "admin:CHANGE_ME"}
    refused = subprocess.run(["sh", "-c", script], env=bad, capture_output=True, text=True)
    assert refused.returncode == 1 and "MLFLOW_WORKER_PASSWORD" in refused.stderr
    assert "PREFECT_AUTH_STRING" in refused.stderr

    # The services' own scripts refuse it too (before starting anything).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mc", "mlflow"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} ran >&2\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    minio_env = {
        "PATH": path,
        "MINIO_ROOT_USER": "root",
        "MINIO_ROOT_PASSWORD": secrets.token_hex(8),
        "WORKER_S3_ACCESS_KEY": "grpo-worker",
        "WORKER_S3_SECRET_KEY": "CHANGE_ME",
        "MLFLOW_S3_ACCESS_KEY": "grpo-mlflow",
        "MLFLOW_S3_SECRET_KEY": secrets.token_hex(8),
        "MLFLOW_BUCKET": "mlflow-artifacts",
        "DVC_BUCKET": "dvc",
    }
    done = subprocess.run(["sh", str(INFRA / "minio" / "init.sh")], env=minio_env, capture_output=True, text=True)
    assert done.returncode == 1 and "WORKER_S3_SECRET_KEY" in done.stderr and "mc ran" not in done.stderr
    done = subprocess.run(
        ["sh", str(INFRA / "minio" / "init.sh")],
        env={**minio_env, "WORKER_S3_SECRET_KEY": secrets.token_hex(8)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "mc ran" in done.stderr, done.stderr
    mlflow_env = {
        "PATH": path,
        "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://mlflow:x@postgres:5432/mlflow",
        "MLFLOW_AUTH_DATABASE_URI": "postgresql+psycopg2://mlflow:x@postgres:5432/mlflow_auth",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow-artifacts/",
        "MLFLOW_ALLOWED_HOSTS": "mlflow",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "CHANGE_ME",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(8),
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth" / "basic_auth.ini"),
    }
    done = subprocess.run(
        ["sh", str(INFRA / "mlflow" / "entrypoint.sh")], env=mlflow_env, capture_output=True, text=True
    )
    assert done.returncode == 1 and "CHANGE_ME" in done.stderr and "mlflow ran" not in done.stderr
    users = _load_users_script()
    with pytest.raises(SystemExit, match="MLFLOW_WORKER_PASSWORD"):
        users.service_users({"MLFLOW_WORKER_USER": "worker", "MLFLOW_WORKER_PASSWORD": "CHANGE_ME"})
    with pytest.raises(SystemExit, match="MLFLOW_WORKER_PASSWORD"):
        users.service_users({"MLFLOW_WORKER_USER": "worker"})
    with pytest.raises(SystemExit, match="at least 12 characters"):
        users.service_users({"MLFLOW_WORKER_USER": "worker", "MLFLOW_WORKER_PASSWORD": "short"})
    assert users.service_users({"MLFLOW_WORKER_USER": "worker", "MLFLOW_WORKER_PASSWORD": "s3cret-s3cret"}) == [
        ("worker", "s3cret-s3cret")
    ]


def test_the_workers_mlflow_grants_name_what_the_pipeline_uses():
    """users.py runs in the MLflow image without this project: its copy of the names must match."""
    from pipelines.config import RegisterConfig
    from pipelines.registry.promotion import lock_name
    from pipelines.registry.stage import reference_name

    users = _load_users_script()
    experiments, models = users.resources({}, "WORKER")
    assert experiments == [RegisterConfig().experiment] and models == [RegisterConfig().model_name]
    name = RegisterConfig().model_name
    assert users.model_grants(name) == {name: "EDIT", reference_name(name): "EDIT", lock_name(name): "MANAGE"}
    assert users.resources({"MLFLOW_WORKER_MODELS": "a, b"}, "WORKER")[1] == ["a", "b"]


def _load_users_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlflow_users", INFRA / "mlflow" / "users.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _up(folder: Path) -> subprocess.CompletedProcess:
    """infra/up.sh from a copy of infra/ in `folder`, with a `docker` that only records its arguments."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(f'#!/bin/sh\necho "$@" > {folder}/docker-args\n')
    (bin_dir / "docker").chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(folder)}
    return subprocess.run(["sh", str(folder / "infra" / "up.sh")], env=env, capture_output=True, text=True)


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def test_up_writes_random_secrets_and_refuses_placeholders(tmp_path):
    infra = tmp_path / "infra"
    infra.mkdir()
    for name in ("up.sh", ".env.example", "docker-compose.yml"):
        shutil.copy(INFRA / name, infra / name)
    placeholders = [k for k, v in _env_file(INFRA / ".env.example").items() if "CHANGE_ME" in v]
    assert {"MLFLOW_WORKER_PASSWORD", "WORKER_S3_SECRET_KEY", "MLFLOW_S3_SECRET_KEY"} <= set(placeholders)

    # First run: .env with a fresh random value for every placeholder, private, then compose up.
    done = _up(tmp_path)
    assert done.returncode == 0, done.stderr
    written = _env_file(infra / ".env")
    assert "CHANGE_ME" not in (infra / ".env").read_text() and (infra / ".env").stat().st_mode & 0o077 == 0
    assert len({written[k] for k in placeholders if k != "PREFECT_AUTH_STRING"}) == len(placeholders) - 1
    assert "compose -p grpo --env-file" in (tmp_path / "docker-args").read_text()

    # A secret put back to the placeholder, or emptied: refused, by name, and compose is not run.
    for key, value in (
        ("MLFLOW_WORKER_PASSWORD", "CHANGE_ME"),
        ("MINIO_ROOT_PASSWORD", ""),
        ("PREFECT_AUTH_STRING", "admin:"),
    ):
        (tmp_path / "docker-args").unlink(missing_ok=True)
        text = "".join(f"{k}={value if k == key else v}\n" for k, v in written.items())
        (infra / ".env").write_text(text)
        refused = _up(tmp_path)
        assert refused.returncode == 1 and key in refused.stderr and "refusing to start" in refused.stderr
        assert not (tmp_path / "docker-args").exists()

    # An .env from before the per-service credentials: the new settings are added, secrets random.
    old = {k: v for k, v in written.items() if not k.startswith(("WORKER_S3_", "MLFLOW_S3_", "MLFLOW_WORKER_"))}
    (infra / ".env").write_text("".join(f"{k}={v}\n" for k, v in old.items()))
    done = _up(tmp_path)
    assert done.returncode == 0 and "added WORKER_S3_SECRET_KEY" in done.stdout, done.stderr
    upgraded = _env_file(infra / ".env")
    assert {k: upgraded[k] for k in old} == old and upgraded["WORKER_S3_ACCESS_KEY"] == "grpo-worker"
    assert "CHANGE_ME" not in (infra / ".env").read_text()


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


def _k8s_deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load((INFRA / "prefect-k8s.yaml").read_text())["deployments"]}


def _rendered_pod(job_variables: dict) -> dict:
    """The Job's pod as the worker makes it: the pool's template filled the way Prefect's workers fill it."""
    from prefect.utilities.templating import apply_values

    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    props = template["variables"]["properties"]
    defaults = {name: var["default"] for name, var in props.items() if var.get("default") is not None}
    job = apply_values(template["job_configuration"], {**defaults, **job_variables})
    return job["job_manifest"]["spec"]["template"]["spec"]


def test_the_job_template_turns_gpus_into_the_pods_request_and_limit():
    gpus = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())["variables"]["properties"]["gpus"]
    assert gpus["type"] == "integer" and gpus["default"] == 1, gpus
    for n in (0, 1, 3):
        pod = _rendered_pod({"gpus": n})
        resources = pod["containers"][0]["resources"]
        # An extended resource's request must equal its limit, or Kubernetes refuses the pod.
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == n, resources
    # NCCL's shared-memory transport needs more /dev/shm than the container runtime's 64 MiB.
    in_memory = [v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts.get("/dev/shm") in in_memory, (mounts, pod["volumes"])


def test_k8s_deployments_fit_their_flows_and_the_pools_variables():
    from prefect.utilities.schema_tools import is_valid_schema, validate

    schema = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())["variables"]
    is_valid_schema(schema, preprocess=False)
    for name, deployment in _k8s_deployments().items():
        # As the server checks job variables when a deployment is created (gpus an integer >= 0, ...).
        job_variables = deployment["work_pool"]["job_variables"]
        validate(job_variables, schema, raise_on_error=True, ignore_required=True, allow_none_with_default=True)
        path, _, attr = deployment["entrypoint"].partition(":")
        assert (REPO / path).is_file(), f"{name}: {path} does not exist"
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attr)
        taken = set(inspect.signature(flow.fn).parameters)
        given = {
            *deployment["parameters"],
            *(k for t in deployment.get("triggers", []) for k in t.get("parameters", {})),
        }
        assert given <= taken, f"{name}: {flow.name} takes no {sorted(given - taken)}"


def test_gpu_deployments_start_one_training_rank_per_requested_gpu():
    from pipelines import config

    deployments = _k8s_deployments()
    gpu = {name: d for name, d in deployments.items() if name.endswith("-gpu")}
    assert {"nightly-gpu", "on-new-data-gpu"} <= set(gpu), sorted(deployments)
    worker = yaml.safe_load((INFRA / "k8s" / "worker-values.yaml").read_text())["worker"]["config"]
    for name, deployment in gpu.items():
        pool = deployment["work_pool"]
        assert pool["name"] == worker["workPool"], f"{name}: the GPU job template is {worker['workPool']}'s"
        n = pool["job_variables"]["gpus"]
        assert isinstance(n, int) and n >= 1, f"{name}: gpus={n!r}"
        overrides = deployment["parameters"]["overrides"]
        settings = dict(config.parse_override(text) for text in overrides)
        assert settings.get("runtime.device") == "cuda", f"{name}: {overrides}"
        assert settings.get("train.num_processes") == n, f"{name}: {n} GPUs but {overrides}: one rank per GPU"
        cfg = config.load(REPO / "params.yaml", overrides)  # every key and value is one the config takes
        assert cfg.train.prompts_per_step >= n, (
            f"{name}: {n} ranks but train.prompts_per_step={cfg.train.prompts_per_step}"
        )
        assert _rendered_pod(pool["job_variables"])["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == n
        # The same pipeline as its one-GPU twin, only placed differently.
        twin = deployments[name.removesuffix("-gpu")]
        assert (deployment["entrypoint"], deployment.get("schedules")) == (twin["entrypoint"], twin.get("schedules"))
        strip = [{k: v for k, v in t.items() if k != "name"} for t in deployment.get("triggers", [])]
        assert strip == [{k: v for k, v in t.items() if k != "name"} for t in twin.get("triggers", [])], name
        assert "gpus" not in twin["work_pool"]["job_variables"] and "overrides" not in twin["parameters"], twin["name"]


def test_the_pipeline_image_builds_with_cpu_or_cuda_torch():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile, re.M), "the default build must stay the CPU one"
    pinned = re.search(r'"torch==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pinned)}$", dockerfile, re.M), f"torch {pinned} (pyproject)"
    cuda = re.search(r"^\s*cuda\)(.*)$", dockerfile, re.M)
    assert cuda and "torch==${TORCH_VERSION}" in cuda.group(1) and "index-url" not in cuda.group(1), "PyPI's CUDA wheel"
    assert "--build-arg VARIANT=cuda" in (INFRA / "README.md").read_text()
    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    assert template["variables"]["properties"]["image"]["default"].endswith(":cuda")


def test_pods_run_without_root_privileges_or_a_service_account_token():
    job = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    pods = [job["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]]
    pods += [
        doc["spec"]["template"]["spec"]
        for doc in yaml.safe_load_all((INFRA / "k8s" / "base.yaml").read_text())
        if doc.get("kind") == "Deployment"
    ]
    assert len(pods) >= 2
    for pod in pods:
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        for container in pod["containers"]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            }


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
    worker_env: dict[str, str] | None = None  # MLflow: the worker's own (non-admin) user, as compose makes it


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
        admin = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        # The worker's user, made as compose's `mlflow-users` makes it (twice: the second run only sets the password).
        worker = {"MLFLOW_WORKER_USER": "worker", "MLFLOW_WORKER_PASSWORD": secrets.token_hex(12)}
        said = []
        for _ in range(2):
            made = subprocess.run(
                [sys.executable, str(INFRA / "mlflow" / "users.py")],
                env={**cli_env(), **admin, **worker},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert made.returncode == 0, made.stdout + made.stderr
            said.append(made.stdout)
        assert "created worker" in said[0] and "password set from the environment" in said[1], said
        yield Service(
            url,
            admin,
            {
                "MLFLOW_TRACKING_URI": url,
                "MLFLOW_TRACKING_USERNAME": "worker",
                "MLFLOW_TRACKING_PASSWORD": worker["MLFLOW_WORKER_PASSWORD"],
            },
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
    # The worker's user logs in with its own password, and is no admin: it may not make users.
    worker = base64.b64encode(f"worker:{mlflow_server.worker_env['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()
    assert _status(search, {"Authorization": f"Basic {worker}"}) == 200
    create_user = f"{mlflow_server.url}/api/2.0/mlflow/users/create"
    body = json.dumps({"username": "mallory", "password": secrets.token_hex(8)}).encode()
    as_worker = {"Authorization": f"Basic {worker}", "Content-Type": "application/json"}
    assert _status(create_user, as_worker, body) == 403
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
    # As the compose worker runs: its own MLflow user, not the admin.
    env = {**cli_env(), **s3.env, **prefect_server.env, **mlflow_server.worker_env}

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    dvc = [sys.executable, "-m", "dvc"]
    run(*dvc, "remote", "add", "--default", "stack", "s3://dvc/grpo")
    run(*dvc, "remote", "modify", "stack", "endpointurl", s3.url)
    out = run(sys.executable, "-m", "flows.cli", "run", "--preset", "smoke")
    results = json.loads(out.stdout[out.stdout.index("{") :])
    # The tiny model scores 0 like its reference: no gain, so v1 is challenger. Promoted by hand,
    # through the server (and the registry-held lock on champion moves).
    assert not results["register"]["promoted"] and results["register"]["version"] == "1"
    assert "must beat the reference" in results["register"]["reason"]
    run(sys.executable, "-m", "flows.cli", "promote", "1", "--reason", "infra smoke test")

    # MLflow: runs and registry in Postgres, artifacts in S3, nothing local.
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()
    assert int(postgres.query("mlflow", "select count(*) from runs")) >= 1
    assert postgres.query("mlflow", "select alias from registered_model_aliases where alias = 'champion'") == "champion"
    assert postgres.query("mlflow", "select name from registered_models where name like '%.champion-lock'") == ""
    assert any(k.endswith("adapter_model.safetensors") for k in s3.keys("mlflow-artifacts"))

    # Prefect: the flow run, completed, in Postgres.
    states = postgres.query("prefect", "select state_type from flow_run").split()
    assert "COMPLETED" in states, states

    # DVC: every out pushed to the S3 remote.
    assert json.loads(run(*dvc, "status", "--cloud", "--json").stdout) == {}
    assert s3.keys("dvc")


def test_services_that_mount_the_checkout_cannot_read_infra_env_and_vllm_wants_a_key():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    mounting = {name: svc for name, svc in compose["services"].items() if any(
        str(v).startswith("..:/workspace") for v in svc.get("volumes", []))}  # fmt: skip
    assert {"worker", "vllm-gpu"} <= set(mounting), sorted(mounting)
    for name, service in mounting.items():
        hidden = [v for v in service["volumes"] if isinstance(v, dict) and v.get("target") == "/workspace/infra"]
        assert hidden and hidden[0]["type"] == "tmpfs", name
    for name in ("vllm-gpu", "vllm-cpu"):  # (vllm-cpu's merge key replaced the whole environment, key included)
        assert compose["services"][name]["environment"]["VLLM_API_KEY"].startswith("${VLLM_API_KEY:?"), name
        # as the pipeline's own servers: whole prefills, and no sampling defaults from the model's files
        command = compose["services"][name]["command"]
        assert {"--no-enable-chunked-prefill", "--generation-config=vllm"} <= set(command), name
    assert "VLLM_API_KEY=CHANGE_ME" in (INFRA / ".env.example").read_text()


def test_the_vllm_client_sends_the_api_key(monkeypatch):
    from pipelines.generation.vllm_client import VLLMClient

    monkeypatch.setenv("VLLM_API_KEY", "k-123")
    client = VLLMClient("http://127.0.0.1:9")
    assert client._http.headers["Authorization"] == "Bearer k-123"
    client.close()
