"""Content hashes, one home for all of them: file digests, model-folder pins, dataset digests.

sha256 pins models and data; md5 is what DVC 3 records for a file out, so lineage can compare.
(The pyfunc model in registry/pyfunc_model.py keeps its own copy of `folder_digest`'s rule: it runs
where this project is not installed.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_hash(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digest(files: dict[str, str]) -> str:
    """One sha256 for a model folder: the hash of its sorted (name, file sha256) pairs.

    >>> folder_digest({"b": "2", "a": "1"}) == folder_digest({"a": "1", "b": "2"})
    True
    """
    return hashlib.sha256("".join(f"{n}:{d}\n" for n, d in sorted(files.items())).encode()).hexdigest()


def folder_files(folder: Path) -> dict[str, str]:
    """{file name: sha256} of the plain files directly inside `folder`, sorted by name."""
    return {p.name: file_hash(p) for p in sorted(folder.iterdir()) if p.is_file()}


def folder_sha256(folder: Path) -> str:
    """One sha256 over a model folder's plain files (what `evaluate` records and `register` checks)."""
    return folder_digest(folder_files(folder))


def digest_files(*files: Path) -> str:
    """sha256 over the files' names and contents in the order given (the validated dataset's digest)."""
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
        return file_hash(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(file.relative_to(path).as_posix().encode() + b"\0" + file_hash(file).encode() + b"\n")
    return h.hexdigest()
