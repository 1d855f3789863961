"""A broken local MLflow store is named in one line; SQLite's leftover journal does not make a run dirty."""

from __future__ import annotations

import re
import sqlite3
import subprocess

import pytest

from pipelines.mlflow_store import StoreError, check_reachable
from pipelines.source import changed_files


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "is empty (0 bytes), not an MLflow store"),
        (b"not a database at all, just text" * 10, "is not a SQLite database"),
        (b"SQLite format 3\x00" + b"\xff" * 200, "is a damaged SQLite database"),
    ],
)
def test_a_broken_mlflow_db_is_named_with_the_fix(tmp_path, monkeypatch, content, says):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.db").write_bytes(content)
    with pytest.raises(StoreError, match=re.escape(says)) as refused:
        check_reachable(tmp_path)
    assert str(tmp_path / "mlflow.db") in str(refused.value) and "move it aside" in str(refused.value)


def test_a_good_or_missing_mlflow_db_passes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check_reachable(tmp_path)  # missing: MLflow creates it
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("CREATE TABLE t (x)")
    check_reachable(tmp_path)


def test_a_leftover_sqlite_journal_does_not_make_the_checkout_dirty(tmp_path):
    run = lambda *a: subprocess.run(a, cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    run("git", "add", "-A")
    run("git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "commit", "-qm", "c")
    (tmp_path / "mlflow.db-journal").write_bytes(b"journal")
    assert changed_files(tmp_path) == []
    (tmp_path / "code.py").write_text("x = 2\n")
    assert changed_files(tmp_path) == ["code.py"]


def test_ask_does_not_load_a_damaged_local_base(tmp_path, tiny_reference, caplog):
    import logging
    import shutil

    from pipelines.registry.ask import local_reference

    folder = tmp_path / "models" / "reference"
    shutil.copytree(tiny_reference, folder)
    import json

    sha = json.loads((folder / "manifest.json").read_text())["sha256"]
    assert local_reference(tmp_path, sha) == folder
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # cut short
    with caplog.at_level(logging.WARNING):
        assert local_reference(tmp_path, sha) is None  # the registry's intact copy is used instead
    assert "the local base is damaged" in caplog.text
