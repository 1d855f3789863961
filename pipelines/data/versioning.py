"""`grpo data add PATH`: bring a file or folder into data/raw, version it with DVC, push it.

DVC runs as `python -m dvc` from this interpreter (the project's own pinned DVC), in the project
root, one command at a time (DVC allows one process per workspace).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    `dvc push` it, and return its digest. A path directly in data/raw is versioned in place.

    The copy keeps the name the user gave (a symlink's own name, not its target's). Refused: a source
    that holds or lies in the project's data folders (data/raw, data/validated), and a folder with a
    symlink that leads outside it (its content would be versioned and pushed as if it were the folder's).
    """
    source = Path(os.path.abspath(source.expanduser()))  # absolute, symlinks kept: the name is the user's
    if not source.exists():
        raise DataError(f"{source}: not found. Fix: give `grpo data add` an existing file or folder.")
    real = source.resolve()
    if not (real.is_file() or real.is_dir()):
        raise DataError(f"{source}: not a regular file or a folder. Fix: give `grpo data add` a data file or folder.")
    if real.is_dir() and not any(p.is_file() for p in real.rglob("*")):
        raise DataError(f"{source}: the folder is empty. Fix: add data files to it first.")
    if not (paths.root / ".dvc").is_dir():
        raise DataError(
            f"{paths.root}: not a DVC project (no .dvc folder). Fix: run `dvc init` there, or pass --project."
        )
    raw = raw_dir(paths).resolve()
    target = raw / source.name
    _refuse_project_data(paths, source, real, target)
    if real.is_dir():
        _refuse_links_out(source, real)
    if real != target:
        _copy(real, target)
    digest = content_digest(target)
    rel = target.relative_to(paths.root.resolve()).as_posix()
    _run(paths.root, "add", rel)
    dvc_file = f"{rel}.dvc"
    if push:
        _run(paths.root, "push", dvc_file)
    return Added(path=rel, digest=digest, dvc_file=dvc_file, pushed=push)


def _refuse_project_data(paths: Paths, source: Path, real: Path, target: Path) -> None:
    """A DataError for a source that holds data/raw or data/validated, or lies inside one of them
    (except a file or folder directly in data/raw, which is versioned in place)."""
    root = paths.root.resolve()
    raw = raw_dir(paths).resolve()
    validated = paths.validated_dir.resolve()
    for folder in (raw, validated):
        if folder == real or folder.is_relative_to(real):
            raise DataError(
                f"{source}: holds the project's {folder.relative_to(root).as_posix()}, so it would be copied into "
                "data/raw, itself included. Fix: put the new data in a folder of its own and add that folder "
                "(or add each file)."
            )
    if real.is_relative_to(validated):
        raise DataError(
            f"{source}: lies in data/validated, the validate stage's output, not raw data. Fix: add the original "
            "data file or folder."
        )
    if source.is_symlink() and source.parent.resolve() == raw:
        raise DataError(
            f"{source}: a symlink in data/raw (to {real}); DVC versions files, not links. Fix: add {real} itself, "
            "or put the file in place of the link."
        )
    if real.is_relative_to(raw) and real != target:
        raise DataError(
            f"{source}: already inside data/raw under another folder or name. Fix: add "
            f"{raw / real.relative_to(raw).parts[0]} or move it."
        )


def _refuse_links_out(source: Path, real: Path) -> None:
    """A DataError naming the first symlink in the folder that leads outside it, points nowhere, or loops;
    links within the folder are copied as the files they point to."""
    for folder, dirs, files in os.walk(real):
        for name in dirs + files:
            link = Path(folder) / name
            if not link.is_symlink():
                if name in files and not link.is_file():
                    raise DataError(
                        f"{source / link.relative_to(real)}: not a regular file (a pipe, socket or device). "
                        "Fix: remove it from the folder."
                    )
                continue
            shown = source / link.relative_to(real)
            to = Path(os.path.realpath(link))
            if not to.exists():
                raise DataError(f"{shown}: a symlink to {os.readlink(link)}, which does not exist. Fix: remove it.")
            if not to.is_relative_to(real):
                raise DataError(
                    f"{shown}: a symlink to {to}, outside {source}; its content would be versioned and pushed as "
                    "part of the folder. Fix: copy the file into the folder, or remove the link."
                )
            if to.is_dir() and link.parent.resolve().is_relative_to(to):
                raise DataError(f"{shown}: a symlink to {to}, a folder that holds it (a loop). Fix: remove it.")


def _copy(source: Path, target: Path) -> None:
    """Copy beside the target first, then rename: an interrupted copy never looks like a version.

    Race-proof against a file swapped for a symlink after the checks: files are opened without
    following links (O_NOFOLLOW), a folder is copied with its links as links, and the links of the
    copy, not of the source, are then checked and replaced by the files they point to in the copy.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            _copy_file_nofollow(source, tmp)
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    staging = staging_dir(target)
    try:
        shutil.copytree(source, staging, symlinks=True, copy_function=_copy_file_nofollow, dirs_exist_ok=True)
        _materialise_links(staging, source)
        if target.is_file():
            target.unlink()
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_file_nofollow(src: Any, dst: Any, *, follow_symlinks: bool = True) -> Any:
    """shutil's copy function, but a source that is (or became) a symlink or no regular file is refused."""
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{src}: became a symlink while it was being copied; nothing was versioned") from None
        raise
    with os.fdopen(fd, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
            raise DataError(f"{src}: not a regular file (a pipe, socket or device). Fix: remove it from the folder.")
        with open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    return dst


def _materialise_links(staging: Path, source: Path) -> None:
    """Replace each symlink of the copy by a copy of what it points to inside the copied folder;
    refuse one that leads outside it (whatever the source held when it was checked)."""
    for folder, dirs, files in os.walk(staging):
        for name in dirs + files:
            link = Path(folder) / name
            if not link.is_symlink():
                continue
            shown = source / link.relative_to(staging)
            to = Path(os.path.realpath(link))
            inside = (
                to
                if to.is_relative_to(staging)
                else staging / to.relative_to(source)
                if to.is_relative_to(source)
                else None
            )
            if inside is None or not inside.exists() or inside.is_symlink():
                raise DataError(
                    f"{shown}: a symlink to {os.readlink(link)}, outside {source} (or it changed while it was copied); "
                    "nothing was versioned. Fix: copy the file into the folder, or remove the link."
                )
            link.unlink()
            if inside.is_dir():
                if link.parent.resolve().is_relative_to(inside.resolve()):
                    raise DataError(f"{shown}: a symlink to a folder that holds it (a loop). Fix: remove it.")
                shutil.copytree(inside, link, symlinks=True)
            else:
                shutil.copyfile(inside, link, follow_symlinks=False)


def _run(root: Path, *args: str) -> str:
    """DVC, with its failure said as a DataError (the `grpo data add` command prints those plainly)."""
    try:
        return run_dvc(root, *args)
    except DvcError as exc:
        raise DataError(str(exc)) from None
