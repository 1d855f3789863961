"""`grpo data add PATH`: bring a file or folder into data/raw, version it with DVC, push it.

DVC runs as `python -m dvc` from this interpreter (the project's own pinned DVC), in the project
root, one command at a time (DVC allows one process per workspace).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipelines.data.errors import DataError
from pipelines.dvc import DvcError, run_dvc
from pipelines.hashing import content_digest
from pipelines.io import replace_dir, staging_dir
from pipelines.paths import Paths


@dataclass
class Added:
    path: str  # where the data now lives, relative to the project root
    digest: str  # sha256 of the content (see content_digest)
    dvc_file: str
    pushed: bool


def raw_dir(paths: Paths) -> Path:
    return paths.root / "data" / "raw"


def add_raw(paths: Paths, source: Path, push: bool = True) -> Added:
    """Copy `source` into data/raw/ (replacing an earlier version of the same name), `dvc add` it,
    `dvc push` it, and return its digest. A path already inside data/raw is versioned in place."""
    source = source.expanduser().resolve()
    if not source.exists():
        raise DataError(f"{source}: not found. Fix: give `grpo data add` an existing file or folder.")
    if source.is_dir() and not any(p.is_file() for p in source.rglob("*")):
        raise DataError(f"{source}: the folder is empty. Fix: add data files to it first.")
    if not (paths.root / ".dvc").is_dir():
        raise DataError(
            f"{paths.root}: not a DVC project (no .dvc folder). Fix: run `dvc init` there, or pass --project."
        )
    raw = raw_dir(paths).resolve()
    target = raw / source.name
    if source != target:
        if raw in source.parents:
            raise DataError(
                f"{source}: already inside data/raw under another folder. Fix: add {target.parent} or move it."
            )
        _copy(source, target)
    digest = content_digest(target)
    rel = target.relative_to(paths.root.resolve()).as_posix()
    _run(paths.root, "add", rel)
    dvc_file = f"{rel}.dvc"
    if push:
        _run(paths.root, "push", dvc_file)
    return Added(path=rel, digest=digest, dvc_file=dvc_file, pushed=push)


def _copy(source: Path, target: Path) -> None:
    """Copy beside the target first, then rename: an interrupted copy never looks like a version."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(source, tmp)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return
    staging = staging_dir(target)
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        if target.is_file():
            target.unlink()
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(root: Path, *args: str) -> str:
    """DVC, with its failure said as a DataError (the `grpo data add` command prints those plainly)."""
    try:
        return run_dvc(root, *args)
    except DvcError as exc:
        raise DataError(str(exc)) from None
