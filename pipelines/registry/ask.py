"""`grpo ask`: load a registered version through its MLflow pyfunc flavour and answer questions.

This is what any client does with only mlflow, torch, transformers and peft installed:
`mlflow.pyfunc.load_model("models:/<name>/<version>").predict([question, ...])`. The model is
loaded once for all the questions. When the project's pinned reference (models/reference) is the
base the version was trained on (same sha256 as its `reference_sha256` tag), it is loaded from
there (the pyfunc model's `base_path`) instead of being copied out of the registry first; the
pyfunc model checks the files' sha256 either way.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.mlflow_store import registry_client
from pipelines.registry.promotion import PromotionError, get_version

# Questions per generate call: left-padded batches, so short ones do not wait on many long ones.
BATCH_SIZE = 8

log = logging.getLogger(__name__)


@dataclass
class Answers:
    name: str
    version: str
    alias: str | None
    questions: list[str]
    answers: list[str]
    base: str  # where the base model was loaded from
    load_s: float  # registry look-up and model load
    answer_s: float  # generation, all questions


def local_reference(root: Path, expected_sha256: str | None) -> Path | None:
    """models/reference when its manifest pins the same sha256 as `expected_sha256` and its files match
    it, else None (the registry's own copy of the base is used then)."""
    folder = root / "models" / "reference"
    try:
        pinned = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError):
        return None
    if not expected_sha256 or pinned != expected_sha256:
        return None
    from pipelines.snapshot.manifest import SnapshotError, verify

    try:
        verify(folder)  # every file against its sha256: a damaged local copy must not be loaded
    except (SnapshotError, OSError, ValueError, KeyError) as exc:
        log.warning("the local base is damaged (%s): using the registry's copy instead", exc)
        return None
    return folder


def ask(
    questions: str | list[str],
    *,
    root: Path,
    name: str,
    alias: str | None = "champion",
    version: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = BATCH_SIZE,
    device: str | None = None,
) -> Answers:
    """The greedy answers of `name@alias` (or `name` version `version`) to `questions`, one model load."""
    started = time.perf_counter()
    import mlflow

    questions = [questions] if isinstance(questions, str) else list(questions)
    client = registry_client(root)
    if version is None:
        if alias is None:
            raise PromotionError("name a version or an alias, e.g. --alias champion")
        try:
            found = client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException as exc:
            raise PromotionError(
                f"{name} has no version with alias {alias!r}; `grpo models` lists the aliases"
            ) from exc
        version = str(found.version)
    else:
        found = get_version(client, name, version)
        alias = None
    # Load the version found, not the alias again: should the alias move meanwhile, the answer still
    # comes from the version this function reports.
    overrides: dict[str, object] = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    if device:  # runtime.device, resolved; without it the pyfunc model takes the GPU where there is one
        overrides["device"] = device
    local = local_reference(root, (found.tags or {}).get("reference_sha256"))
    if local is not None:
        overrides["base_path"] = str(local)
    base = f"{local.relative_to(root)} (sha256 matches)" if local else "the registry's reference"
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}", model_config=overrides or None)
    except mlflow.exceptions.MlflowException as exc:
        if "MLmodel" in str(exc):
            raise PromotionError(
                f"{name} v{version} has no pyfunc flavour (registered before it existed); load it with transformers + "
                "peft as docs/registry.md shows, or register it again"
            ) from exc
        raise
    loaded = time.perf_counter()
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        answers += [str(a) for a in model.predict(questions[start : start + batch_size])]
    return Answers(
        name=name,
        version=version,
        alias=alias,
        questions=questions,
        answers=answers,
        base=base,
        load_s=loaded - started,
        answer_s=time.perf_counter() - loaded,
    )
