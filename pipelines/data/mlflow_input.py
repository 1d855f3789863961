"""The validated dataset as an MLflow dataset: the training run's input, and what its checkpoints' metrics name."""

from __future__ import annotations

import json
from typing import Any

from pipelines.data.errors import DataError
from pipelines.hashing import digest_files
from pipelines.paths import Paths

# MLflow stores a dataset digest in 36 characters (its SQL schema); the full sha256 goes in a tag.
DIGEST_CHARS = 32


def log_dataset_input(paths: Paths) -> None:
    """Log data/validated (train, val and eval splits) as the active run's dataset input, context
    "training", named after the source, with the digest reports/validation.json gives those files
    (the first 32 hex digits as MLflow's dataset digest, all 64 in the `dataset_digest` tag).

    Call it inside `mlflow.start_run()`: with no active run it raises instead of letting MLflow
    open a stray run.
    """
    import mlflow

    if mlflow.active_run() is None:
        raise RuntimeError("log_dataset_input needs an active MLflow run (call it inside mlflow.start_run())")
    dataset, tags = validated_dataset(paths)
    mlflow.log_input(dataset, context="training", tags=tags)


def validated_dataset(paths: Paths) -> tuple[Any, dict[str, str]]:
    """(the MLflow dataset of data/validated, its input tags): what the training run logs as its input,
    and what the checkpoints' validation metrics name as their dataset (pipelines/grpo/logged_models.py)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array, Object, Property

    if not all(p.exists() for p in (paths.train_split, paths.val_split, paths.eval_split)):
        raise DataError(f"{paths.validated_dir}: no validated splits. Fix: run `grpo validate` first.")
    # The digest of the files training reads, computed as validate does: it equals the report's
    # digest, unless a later refused dataset rewrote the report and left these files in place.
    digest = digest_files(paths.train_split, paths.val_split, paths.eval_split)
    report = json.loads(paths.validation_report.read_text(encoding="utf-8")) if paths.validation_report.exists() else {}
    stale = report.get("digest") != digest
    if stale:
        report = {}
    source = str(report.get("source", "unknown"))
    # The schema every validated row has (extra columns vary by dataset and are left out).
    message = Object([Property("role", DataType.string), Property("content", DataType.string)])
    schema = Schema(
        [ColSpec(DataType.string, "id"), ColSpec(Array(message), "prompt"), ColSpec(DataType.string, "answer")]
    )
    dataset = MetaDataset(
        source=LocalArtifactDatasetSource(str(paths.validated_dir)),
        name=f"validated:{source.rsplit('/', 1)[-1]}",
        digest=digest[:DIGEST_CHARS],
        schema=schema,
    )
    tags = {
        "dataset_digest": digest,
        "dataset_source": source,
        "train_rows": str(report.get("train_rows", "unknown")),
        "val_rows": str(report.get("val_rows", "unknown")),
        "eval_rows": str(report.get("eval_rows", "unknown")),
        "rejected_rows": str(report.get("rejected", "unknown")),
        **({"validation_report": "describes another validation (a later refused dataset)"} if stale else {}),
    }
    return dataset, tags
