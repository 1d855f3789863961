"""Fetch the registry's current champion so it can be re-scored on the same problems as the candidate.

A champion's recorded score came from another evaluation (other problems, other decoding); the gate
needs its outcomes on this evaluation's problems. Its base is this project's reference when the
sha256 matches, else the base it was trained on (its `reference_model_uri`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.mlflow_store import CHAMPION, alias_version, registry_client, store_exists


@dataclass(frozen=True)
class Champion:
    version: str
    adapter_dir: Path
    base_dir: Path | None  # None: the same reference as the candidate (same sha256)
    reference_sha256: str


def champion_version(name: str, root: Path) -> str | None:
    """The version number holding `champion`, or None when there is none."""
    if not store_exists(root):
        return None  # and do not create an empty store just to look
    champion = alias_version(registry_client(root), name, CHAMPION)
    return str(champion.version) if champion is not None else None


def fetch(name: str, root: Path, reference_sha256: str, dest: Path) -> Champion | None:
    """Download `name@champion` (adapter, and its base when that differs from ours) into `dest`."""
    import mlflow
    from mlflow import MlflowClient

    version = champion_version(name, root)
    if version is None:
        return None
    # Pin the version found: should the alias move meanwhile, the outcomes still name what was scored.
    tags = MlflowClient().get_model_version(name, version).tags
    adapter = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dest / "adapter")))
    sha = tags.get("reference_sha256", "")
    base = None
    if sha != reference_sha256:
        uri = tags.get("reference_model_uri")
        if not uri:
            raise RuntimeError(
                f"champion {name} v{version} was trained on another base (sha256 {sha or 'unknown'}) and has no "
                "reference_model_uri tag to fetch it from; promote a version registered by this pipeline or set "
                "evaluate.champion=false"
            )
        base = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dest / "base")))
    return Champion(version=version, adapter_dir=adapter, base_dir=base, reference_sha256=sha)
