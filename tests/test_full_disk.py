"""A real full disk (a small tmpfs, where this machine lets a test mount one): stages refuse to start
and name what they need, and files the pipeline rewrites stay whole."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_project


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder: Path, leave: int) -> None:
    """Fill the disk of `folder` until `leave` bytes are free."""
    free = shutil.disk_usage(folder).free
    with (folder / "filler.bin").open("wb") as fh:
        fh.truncate(0)
        block = b"\0" * (1 << 20)
        todo = max(0, free - leave)
        while todo > 0:
            n = min(len(block), todo)
            try:
                fh.write(block[:n])
                fh.flush()
            except OSError:
                break
            todo -= n


def test_on_a_full_disk_a_stage_refuses_to_start_and_params_yaml_stays_whole(small_disk):
    from pipelines import config
    from pipelines.diskspace import DiskSpaceError
    from pipelines.params_file import write_params
    from pipelines.paths import Paths
    from pipelines.stages import run_stage

    root = make_project(small_disk / "project")
    before = (root / "params.yaml").read_bytes()
    cfg = config.load(root / "params.yaml", preset="smoke")
    _fill(small_disk, leave=2048)
    with pytest.raises(DiskSpaceError, match=r"for `validate` .* MB free, it needs about \d+ MB"):
        run_stage("validate", cfg, Paths(root))
    assert not (root / "data" / "validated" / "train.jsonl").exists()
    # A rewrite that cannot fit fails, and leaves the old file whole (never empty, never cut short).
    with pytest.raises(OSError):
        write_params(root / "params.yaml", ["data.prompt.system=" + "x" * 9_000], None)
    assert (root / "params.yaml").read_bytes() == before
