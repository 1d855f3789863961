"""Where a model came from: git state (pipelines/source.py), DVC hashes from dvc.lock, dataset and reference digests;
and which of a version's records are its tags (what a reader looks for) and which go to its lineage JSON."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import Config
from pipelines.hashing import file_hash
from pipelines.paths import Paths
from pipelines.source import git_state


def dvc_hashes(root: Path) -> dict[str, str]:
    """{out path: md5} for every out recorded in dvc.lock (empty when there is no lock yet)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    hashes = {}
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("md5"):
                hashes[out["path"]] = out["md5"]
    return hashes


# dvc.lock outs -> version tags: the data the policy was trained and judged on, the checkpoint, the base.
DVC_TAGS = (
    ("data/validated/train.jsonl", "dvc_train_data_md5"),
    ("data/validated/val.jsonl", "dvc_val_data_md5"),
    ("data/validated/eval.jsonl", "dvc_eval_data_md5"),
    ("models/policy", "dvc_policy_md5"),
    ("models/reference", "dvc_reference_md5"),
)


def params_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()


def collect(cfg: Config, paths: Paths) -> dict[str, Any]:
    """The tags every registered version carries."""
    validation = json.loads(paths.validation_report.read_text())
    manifest = json.loads((paths.reference_dir / "manifest.json").read_text())
    hashes = dvc_hashes(paths.root)
    tags = {
        **git_state(paths.root),
        "dataset_digest": validation.get("digest", "unknown"),
        "dataset_source": str(validation.get("source", "unknown")),
        "reference_sha256": manifest["sha256"],
        "reference_source": manifest.get("source"),
        "params_hash": params_hash(cfg),
        "preset": cfg.preset,
    }
    # An out missing from dvc.lock (a stage run by hand, outside DVC and the flow) is said so,
    # not left out: a reader must see that this version's data or checkpoint is not pinned.
    for out, key in DVC_TAGS:
        recorded = hashes.get(out)
        if recorded is None:
            tags[key] = "unrecorded (not in dvc.lock)"
        # DVC 3 records a file out's md5, so that is what to compare with.
        elif (paths.root / out).is_file() and file_hash(paths.root / out, "md5") != recorded:
            tags[key] = f"{recorded} (stale: {out} changed after dvc.lock was written)"
        else:
            tags[key] = recorded
    return present(tags)


def present(tags: dict[str, Any]) -> dict[str, str]:
    """The tags with a value, as strings: an unset one is left out rather than written as "None".

    >>> present({"preset": None, "task": "math", "note": "", "steps": 3})
    {'task': 'math', 'steps': '3'}
    """
    return {k: str(v) for k, v in tags.items() if v is not None and str(v) not in ("", "None")}


# The tags a version carries: what a reader (and `grpo models`, the gate, rollback, `evaluate`'s champion
# fetch) looks a version up by, about 20. The rest of its record (every eval_* figure, the DVC hashes
# from dvc.lock, the gate's checks, the reference's source, what git_dirty means, ...) is its lineage
# JSON, which the `lineage` tag names.
VERSION_TAGS = (
    "git_commit",
    "git_dirty",
    "git_dirty_files",
    "dataset_digest",
    "dataset_source",
    "reference_sha256",
    "reference_model_uri",
    "params_hash",
    "preset",
    "task",
    "eval_accuracy",
    "eval_problems",
    "eval_reference_accuracy",
    "eval_format_rate",
    "eval_gain_vs_reference_ci",
    "eval_champion_version",
    "eval_gain_vs_champion",
    "eval_gain_vs_champion_ci",
    "export_parity",
    "promotion_decision",
    "promotion_reason",
    "registration_key",
    "lineage",
)
# One tag per verifier (`verifier_<name>_sha256`): the gate compares the champion's with today's.
VERIFIER_PREFIX = "verifier_"


def version_tags(record: dict[str, str]) -> dict[str, str]:
    """The part of a version's record that its tags carry (VERSION_TAGS and the verifier hashes), in that order.

    >>> version_tags({"eval_k": "4", "eval_accuracy": "0.5", "verifier_judge_sha256": "ab", "git_commit": "c0"})
    {'git_commit': 'c0', 'eval_accuracy': '0.5', 'verifier_judge_sha256': 'ab'}
    """
    kept = {k: record[k] for k in VERSION_TAGS if k in record}
    return {**kept, **{k: v for k, v in record.items() if k.startswith(VERIFIER_PREFIX)}}
