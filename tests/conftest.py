"""Shared fixtures: offline environment, a tiny pinned reference, and throwaway projects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "datasets" / "gsm8k"

# Before anything imports torch, transformers, mlflow or prefect: nothing may reach the internet.
os.environ.update(
    {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(autouse=True)
def _own_tracking_uri():
    # `mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI in os.environ, which
    # `mlflow_store.tracking_uri` prefers over a project's own mlflow.db and subprocesses inherit:
    # without this, a test that logged in-process sends a later test's `grpo` subprocess to its store.
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def fresh_tracking_uri():
    """No tracking URI set in-process, before and after the test: each test finds its store from its
    project. A module that logs to MLflow opts in with `pytestmark = pytest.mark.usefixtures(...)`."""
    import mlflow

    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny models run ~100x faster on one thread than on torch's default of two here.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory) -> Path:
    """A snapshot of the `tiny` model (random Llama + the embedded model's tokenizer), made once."""
    from pipelines.config import SnapshotConfig
    from pipelines.paths import Paths
    from pipelines.snapshot import stage as snapshot

    root = tmp_path_factory.mktemp("tiny-ref")
    snapshot.run(SnapshotConfig(source="tiny"), Paths(root))
    return root / "models" / "reference"


def make_project(root: Path, dvc: bool = False) -> Path:
    """A project folder like a clone of this repo: params.yaml, dvc.yaml, code deps, git + DVC."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / ".gitkeep").touch()
    if dvc:
        run = lambda *cmd: subprocess.run(cmd, cwd=root, check=True, capture_output=True)  # noqa: E731
        run("git", "init", "-q")
        run("git", "config", "user.email", "ci@example.invalid")
        run("git", "config", "user.name", "ci")
        run(sys.executable, "-m", "dvc", "init", "-q")
        shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
        run("git", "add", "-A")
        run("git", "commit", "-qm", "project")
    return root


def prepared_project(root: Path, tiny_reference: Path, overrides: list[str], preset: str = "smoke"):
    """A project with validated data and the tiny reference in place; returns its config."""
    from pipelines import config
    from pipelines.data import validate
    from pipelines.paths import Paths

    make_project(root)
    cfg = config.load(root / "params.yaml", overrides, preset=preset)
    validate.run(cfg, Paths(root))
    shutil.copytree(tiny_reference, Paths(root).reference_dir)
    return cfg


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture
def smoke_cfg(project):
    from pipelines import config

    return config.load(project / "params.yaml", preset="smoke")


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def download_version(name: str, alias: str, dest: Path) -> tuple[Path, Path]:
    """(base model folder, adapter folder) of `name@alias`, from the registry as docs/registry.md shows."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    version = client.get_model_version_by_alias(name, alias)
    adapter = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{alias}", dst_path=str(dest / "adapter")))
    base = Path(mlflow.artifacts.download_artifacts(version.tags["reference_model_uri"], dst_path=str(dest / "base")))
    return base, adapter


def free_port() -> int:
    """A loopback port nobody listens on now: the rendezvous of processes a test starts itself."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeRanks:
    """Stands in for the process group in `distributed.loss_share`: `sum` returns the total over all ranks."""

    size = 2

    def __init__(self, total: float) -> None:
        self.total = total

    def sum(self, value: float) -> float:
        return self.total
