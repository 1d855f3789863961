"""Small file helpers shared by the stages: atomic writes (files and folder swaps), JSON and JSONL."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written staging folder into place; the old one is removed only afterwards.

    Two renames (target -> `.<name>.old`, staging -> target). A crash between them leaves the old
    folder only as `.old`: the next swap of the same target (or `recover_dir`) first puts it back,
    so the target is always the whole old folder or the whole new one, never lost.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    old = _old(target)
    moved_aside = False
    if target.exists():
        os.replace(target, old)
        moved_aside = True
    try:
        os.replace(staging, target)
    except BaseException:
        if moved_aside and not target.exists():
            try:  # put the old folder back now; should this fail too, recover_dir does it next time
                os.replace(old, target)
            except Exception:
                pass
        raise
    if old.exists():
        shutil.rmtree(old)


def recover_dir(target: Path) -> None:
    """Finish what an interrupted `replace_dir` left behind: restore `.old` or drop it.

    Target missing and `.old` present: the swap stopped between its two renames, and `.old` is the
    last complete folder, so it goes back into place. Both present: the swap finished and only the
    clean-up was cut short, so `.old` is removed.
    """
    old = _old(target)
    if not old.exists():
        return
    if target.exists():
        shutil.rmtree(old)
    else:
        os.replace(old, target)


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def staging_dir(target: Path) -> Path:
    """A fresh empty folder beside `target` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging."))


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Write into a staging folder; it replaces `target` only if the block finishes without error.

    An interrupted earlier swap of `target` is recovered first, so the block (and any reader) finds
    the last complete folder even when the block then fails.
    """
    recover_dir(target)
    staging = staging_dir(target)
    try:
        yield staging
        replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def carry_over(source: Path, staging: Path) -> None:
    """Copy into `staging` whatever `source` holds that `staging` does not (e.g. DVC's .gitignore in
    a folder of outs), so that swapping `staging` in for `source` loses nothing else."""
    if not source.is_dir():
        return
    for item in source.iterdir():
        if (staging / item.name).exists() or (staging / item.name).is_symlink():
            continue
        if item.is_symlink():
            os.symlink(os.readlink(item), staging / item.name)
        elif item.is_dir():
            shutil.copytree(item, staging / item.name, symlinks=True)
        else:
            shutil.copy2(item, staging / item.name)


@contextmanager
def replaced_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, with its suffix (so writers that go by it, like matplotlib's
    savefig, still do); renamed over `path` in one step when the block finishes, dropped otherwise.
    A reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
