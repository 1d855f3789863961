"""Content digests (sha256) of datasets: the validated splits and raw files or folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipelines.io import file_hash


def file_sha256(path: Path) -> str:
    return file_hash(path, "sha256")


def digest_files(*files: Path) -> str:
    """sha256 over the files' names and contents, read in chunks (the validated dataset's digest)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes; for a folder, of every file's relative path and sha256, sorted,
    so the digest names the content whatever the copy's timestamps or the order of listing."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(file.relative_to(path).as_posix().encode() + b"\0" + file_sha256(file).encode() + b"\n")
    return h.hexdigest()
