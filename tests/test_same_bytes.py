"""Same inputs, same bytes: a pinned reference does not depend on the shell, the clock or the folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, make_project


def _snapshot(root, **env_changes) -> dict[str, bytes]:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    make_project(root)
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "snapshot", "--project", str(root), "-S", "snapshot.source=tiny"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    folder = root / "models" / "reference"
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_reference_has_the_same_bytes_from_two_shells(tmp_path):
    # `make demo` runs offline, `dvc repro` from a plain shell may not: a different TZ, folder and hub setting
    offline = _snapshot(tmp_path / "a", HF_HUB_OFFLINE="1", TZ="UTC")
    plain = _snapshot(tmp_path / "elsewhere" / "b", HF_HUB_OFFLINE=None, TZ="Asia/Tokyo")
    assert offline.keys() == plain.keys()
    differing = [name for name in offline if offline[name] != plain[name]]
    assert not differing, f"these files depend on the environment: {differing}"
    manifest = json.loads(offline["manifest.json"])
    tokenizer_config = json.loads(offline["tokenizer_config.json"])
    assert "local_files_only" not in tokenizer_config  # the key that followed HF_HUB_OFFLINE
    assert manifest["sha256"] == json.loads(plain["manifest.json"])["sha256"]


def test_the_same_training_in_two_folders_gives_the_same_policy_bytes(tmp_path, tiny_reference):
    # a clone elsewhere, or `dvc exp run --temp`: the adapter must not record where it was trained
    import shutil

    from pipelines import config
    from pipelines.data import validate
    from pipelines.grpo import trainer
    from pipelines.paths import Paths

    policies = []
    for name in ("a", "b"):
        root = make_project(tmp_path / name / "project")
        cfg = config.load(root / "params.yaml", ["train.steps=2"], preset="smoke")
        paths = Paths(root)
        validate.run(cfg, paths)
        shutil.copytree(tiny_reference, paths.reference_dir)
        trainer.run(cfg, paths, log_to_mlflow=False)
        policies.append({p.name: p.read_bytes() for p in sorted(paths.policy_dir.iterdir()) if p.is_file()})
    assert "adapter_model.safetensors" in policies[0]
    assert [name for name in policies[0] if policies[0][name] != policies[1].get(name)] == []
    assert json.loads(policies[0]["adapter_config.json"])["base_model_name_or_path"] == "models/reference"


def test_a_stage_run_by_a_prefect_worker_gets_the_same_environment_as_grpo(tmp_path, monkeypatch):
    # A worker imports the flow, not `grpo`: run_stage itself sets what `grpo` sets, before any heavy import.
    import pytest

    from pipelines import config
    from pipelines.env import QUIET
    from pipelines.paths import Paths
    from pipelines.stages import run_stage

    for key in QUIET:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "false")  # a user's own setting wins
    with pytest.raises(ValueError, match="unknown stage"):
        run_stage("nope", config.resolve({}), Paths(tmp_path))
    assert {k: v for k, v in QUIET.items() if k != "DO_NOT_TRACK"}.items() <= dict(os.environ).items()
    assert os.environ["DO_NOT_TRACK"] == "false"
