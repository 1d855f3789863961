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
