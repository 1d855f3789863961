"""The pin of a reference model: manifest.json with every file's sha256, and its check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.hashing import file_hash

MANIFEST = "manifest.json"


class SnapshotError(RuntimeError):
    """The reference model cannot be resolved or does not match its manifest."""


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of a pinned model folder, after checking every file against its sha256."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise SnapshotError(f"{manifest_path} not found; run `grpo snapshot` first")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["files"].items():
        if not (folder / name).exists() or file_hash(folder / name) != digest:
            raise SnapshotError(
                f"{folder / name} does not match its sha256 in {manifest_path}; run `grpo snapshot` again"
            )
    return manifest
