"""A dvc.lock left empty or cut short (a full disk, a kill mid-write) never wedges later runs."""

from __future__ import annotations

import logging

from pipelines.dvc import GOOD_COPY, LOCK, run_dvc
from tests.conftest import make_project

WHOLE = "schema: '2.0'\nstages: {}\n"


def test_an_empty_dvc_lock_is_put_back_or_removed(tmp_path, caplog):
    root = make_project(tmp_path / "project", dvc=True)
    (root / LOCK).write_text(WHOLE)
    run_dvc(root, "status")
    assert (root / GOOD_COPY).read_text() == WHOLE  # the last whole copy, kept after each DVC command
    (root / LOCK).write_bytes(b"")  # what a full disk left
    with caplog.at_level(logging.WARNING):
        run_dvc(root, "status")  # works instead of failing on the empty file
    assert (root / LOCK).read_text() == WHOLE and "put back the last whole copy" in caplog.text
    (root / LOCK).write_text("schema: '2.0'\nstages:\n  validate: {cmd: [")  # cut short
    (root / GOOD_COPY).unlink()
    run_dvc(root, "status")
    assert not (root / LOCK).exists() and "no whole copy was kept: removed" in caplog.text


def test_a_stage_without_the_disk_space_it_needs_is_refused_before_it_starts(tmp_path, monkeypatch):
    import shutil

    import pytest

    from pipelines import config, diskspace
    from pipelines.paths import Paths
    from pipelines.stages import run_stage

    root = make_project(tmp_path / "project")
    cfg = config.load(root / "params.yaml", preset="smoke")
    usage = shutil.disk_usage(root)
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda _: usage._replace(free=10 * diskspace.MB))
    with pytest.raises(diskspace.DiskSpaceError, match=r"for `validate` in .*: 10 MB free, it needs about \d+ MB"):
        run_stage("validate", cfg, Paths(root))
    assert not (root / "data" / "validated").exists()
