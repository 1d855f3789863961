"""The training run's checkpoints as MLflow LoggedModels (MLflow 3): one per step scored on the validation split.

Each model is named `step-NNNNNN`, has the training run as its source (and is that run's output at its
step), a few training params, tags (`step`, `selected`, `checkpoint_path`, `weights`, the data and
reference digests) and the validation figures of its step (`eval/*`, the points the run logged) as
model metrics tied to the run's dataset input (its name and digest): the experiment's Models tab ranks
the checkpoints of one dataset side by side, and `mlflow.search_logged_models` sorts them.

A step whose trainable weights are still on disk (a checkpoint train.keep_checkpoints kept, or
checkpoints/best) gets them in its artifacts as a peft adapter folder, written by `policy.save` as
models/policy is. The pyfunc wrapper that makes a folder registrable is the registry's
(pipelines/registry/pyfunc_model.py, a later stage that training may not import), so `grpo promote
--checkpoint` (pipelines/registry/checkpoints.py) adds it when it registers one. A step whose weights
were rotated away stays a model with its metrics, tagged `weights: pruned by train.keep_checkpoints`,
and is finalized FAILED with a description that says why: MLflow 3 has no status for "metrics only",
and READY would show it in the UI as a finished model with a Register button and no files.
A model with weights carries `weights_sha256` (the sha256 of its adapter_model.safetensors), which
`grpo register` matches against the adapter it evaluated, to register this very model rather than a
copy of it. (Not the whole folder's: tokenizer.json records the tokenizer's padding state, which
differs between two saves of the same tokenizer.)

Logged once, at the end of training. A resumed run looks first: a step it already logged (READY or
FAILED) is left as it is (only `selected` is set again), one left unfinished by a crash (PENDING) is
completed, none is logged twice.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.config import Config
from pipelines.data.mlflow_input import validated_dataset
from pipelines.grpo import checkpoint, policy
from pipelines.grpo.validation import Score
from pipelines.hashing import file_hash
from pipelines.mlflow_store import flatten
from pipelines.paths import Paths
from pipelines.source import mlflow_source_tags

log = logging.getLogger(__name__)

# The logged models' type, which tells them from any other model in the experiment.
MODEL_TYPE = "grpo-checkpoint"
# Tags every checkpoint model has; `weights` says whether its artifacts hold the adapter.
STEP, SELECTED, CHECKPOINT_PATH, WEIGHTS = "step", "selected", "checkpoint_path", "weights"
LOGGED = "logged"
PRUNED = "pruned by train.keep_checkpoints"
NOT_LORA = "not logged: full fine-tuning (the registry holds LoRA adapters)"
# A kept checkpoint's adapter is about 23 MB for the SmolLM2-135M demo at r=16 (19.5 MB of fp32 LoRA
# weights, the 3.5 MB tokenizer); train.checkpoint_model_weights=false logs metrics only.
NOT_UPLOADED = "not logged: train.checkpoint_model_weights is false"
# The sha256 of a model's adapter weights file (peft's name for it), the tag that matches it to models/policy.
WEIGHTS_SHA256, ADAPTER_WEIGHTS = "weights_sha256", "adapter_model.safetensors"
# MLflow's key for a description, which the UI shows on a logged model's page as on a run's.
NOTE = "mlflow.note.content"
# The training params each model carries (all of them are on its run): what tells checkpoints of
# different runs apart in the Models tab.
PARAMS = (
    "train.learning_rate",
    "train.beta",
    "train.loss_type",
    "train.lora.enabled",
    "train.lora.r",
    "train.lora.alpha",
    "train.num_generations",
    "train.prompts_per_step",
    "train.steps",
    "snapshot.source",
    "preset",
)


def model_name(step: int) -> str:
    """The logged model's name: the step, as its checkpoint folder is named.

    >>> model_name(10)
    'step-000010'
    """
    return f"step-{step:06d}"


def weights_on_disk(checkpoints_dir: Path) -> dict[int, Path]:
    """step -> the folder that still holds its trainable weights: each kept step-N checkpoint, and best/."""
    found: dict[int, Path] = {}
    best = checkpoints_dir / checkpoint.BEST
    if (best / "best.json").exists() and (best / "trainable.safetensors").exists():
        found[int(json.loads((best / "best.json").read_text())["step"])] = best
    for folder in sorted(checkpoints_dir.glob("step-*")):
        if (folder / "trainable.safetensors").exists() and folder.name[5:].isdigit():
            found[int(folder.name[5:])] = folder  # a step folder over best/: the path names the step
    return found


def existing(experiment_id: str, run_id: str) -> dict[int, Any]:
    """The checkpoint models `run_id` has already logged, by step."""
    import mlflow

    models = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND model_type = '{MODEL_TYPE}'",
        output_format="list",
    )
    return {int(m.tags[STEP]): m for m in models if m.tags.get(STEP, "").isdigit()}


def log_checkpoints(
    cfg: Config, paths: Paths, run_id: str, scores: Sequence[Score], selected: int, model: Any, tokenizer: Any
) -> list[Any]:
    """Log (or complete) one LoggedModel per validated step of training run `run_id`; return them.

    `model` is the trained policy: each step's weights are loaded into it in turn to be saved as an
    adapter, and its own weights are put back afterwards.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    steps = [s for s in scores if s.step > 0]  # step 0 is the reference itself, not a checkpoint
    if not steps:  # no validation split: nothing was scored, so nothing to rank
        return []
    started = time.perf_counter()
    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    dataset, dataset_tags = validated_dataset(paths)
    done = existing(experiment_id, run_id)
    # The run's own points (with their timestamps): logged again with the model id, they are the
    # same points to the run (MLflow drops exact repeats), so its curves gain no duplicates.
    keys = sorted({k for s in steps for k in s.metrics()})
    stamps = {(m.key, m.step): m.timestamp for k in keys for m in client.get_metric_history(run_id, k)}
    uploads = cfg.train.lora.enabled and cfg.train.checkpoint_model_weights
    on_disk = weights_on_disk(paths.checkpoints_dir) if uploads else {}
    reference_sha = json.loads((paths.reference_dir / "manifest.json").read_text())["sha256"]
    flat = flatten(cfg.model_dump())
    params = {k: str(flat[k]) for k in PARAMS if k in flat}
    source = mlflow_source_tags(paths.root, "grpo train")  # the project's commit, not the `grpo` script's
    trained = checkpoint.trainable_state(model) if on_disk else None
    kept = sorted(s.step for s in steps if s.step in on_disk)
    shared = {**source, "dataset_digest": dataset_tags["dataset_digest"], "reference_sha256": reference_sha}
    logged = []
    try:
        for score in steps:
            found = done.get(score.step)
            if found is not None and LoggedModelStatus.is_finalized(found.status):
                client.set_logged_model_tags(found.model_id, {SELECTED: str(score.step == selected).lower()})
                logged.append(found)
                continue
            folder = on_disk.get(score.step)
            tags = {
                **shared,
                STEP: str(score.step),
                SELECTED: str(score.step == selected).lower(),
                CHECKPOINT_PATH: _relative(folder, paths.root) if folder is not None else "-",
                WEIGHTS: LOGGED if folder is not None else _why_not(cfg),
                NOTE: describe(cfg, score.step, folder, paths.root, kept),
            }
            if found is None:
                found = mlflow.initialize_logged_model(
                    name=model_name(score.step),
                    source_run_id=run_id,
                    tags=tags,
                    params=params,
                    model_type=MODEL_TYPE,
                    experiment_id=experiment_id,
                )
                client.log_outputs(run_id, [LoggedModelOutput(found.model_id, step=score.step)])
            else:  # left unfinished by an interrupted run: complete it
                client.set_logged_model_tags(found.model_id, tags)
            client.log_batch(run_id, metrics=_points(score, found.model_id, stamps, dataset, run_id))
            if folder is not None:
                _log_adapter(client, found.model_id, folder, model, tokenizer)
            # Metrics only: FAILED, MLflow's one final status besides READY (which says the files are there).
            status = LoggedModelStatus.READY if folder is not None else LoggedModelStatus.FAILED
            logged.append(client.finalize_logged_model(found.model_id, status))
    finally:
        if trained is not None:
            _put_back(model, trained)
    with_weights = sum(1 for m in logged if m.tags.get(WEIGHTS) == LOGGED)
    log.info(
        "logged %d checkpoint models to MLflow (%d with weights, registrable with `grpo promote --checkpoint STEP`) "
        "in %.1f s",
        len(logged), with_weights, time.perf_counter() - started,
    )  # fmt: skip
    return logged


def _points(score: Score, model_id: str, stamps: dict[tuple[str, int], int], dataset: Any, run_id: str) -> list[Any]:
    """A validated step's metrics as points of model `model_id`, at the run's own timestamps where it has them."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(key, value, stamps.get((key, score.step), now), score.step, model_id=model_id,
               dataset_name=dataset.name, dataset_digest=dataset.digest, run_id=run_id)
        for key, value in score.metrics().items()
        if not math.isnan(value)
    ]  # fmt: skip


def describe(cfg: Config, step: int, folder: Path | None, root: Path, with_weights: list[int]) -> str:
    """The model's description (the UI's Description box): what it holds and how to register it, or why it
    holds nothing."""
    if folder is not None:
        return (
            f"Step {step}'s LoRA adapter and tokenizer (peft format), from `{_relative(folder, root)}`, with its "
            f"validation figures. Register it with `grpo promote --checkpoint {step} --reason TEXT`."
        )
    kept = ", ".join(map(str, with_weights)) or "none"
    if not cfg.train.lora.enabled:
        why = "full fine-tuning: the registry holds LoRA adapters, so no checkpoint's weights are logged"
    elif not cfg.train.checkpoint_model_weights:
        why = "train.checkpoint_model_weights is false, so no checkpoint's weights were uploaded"
    else:
        why = (
            f"its weights were pruned by train.keep_checkpoints={cfg.train.keep_checkpoints} before training "
            "ended; keep more next time (-S train.keep_checkpoints=N)"
        )
    return (
        f"**Metrics only, not registrable**: step {step}'s validation figures, no model files ({why}). Its status "
        f"is FAILED because MLflow has no status for a model without files. Steps with weights: {kept}."
    )


def _log_adapter(client: Any, model_id: str, folder: Path, model: Any, tokenizer: Any) -> None:
    """The step's weights, loaded into `model`, saved as a peft adapter folder into the logged model's artifacts."""
    checkpoint.load_weights(folder, model)
    with tempfile.TemporaryDirectory(prefix="grpo-checkpoint-") as tmp:
        policy.save(model, tokenizer, tmp)  # the peft adapter + tokenizer, as models/policy
        client.log_model_artifacts(model_id, tmp)
        client.set_logged_model_tags(model_id, {WEIGHTS_SHA256: file_hash(Path(tmp) / ADAPTER_WEIGHTS)})


def _why_not(cfg: Config) -> str:
    """The `weights` tag of a checkpoint whose adapter is not in its artifacts."""
    if not cfg.train.lora.enabled:
        return NOT_LORA
    return PRUNED if cfg.train.checkpoint_model_weights else NOT_UPLOADED


def _put_back(model: Any, state: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def _relative(folder: Path, root: Path) -> str:
    try:
        return folder.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(folder)
