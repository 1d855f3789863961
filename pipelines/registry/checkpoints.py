"""`grpo promote --checkpoint`: register one of a training run's checkpoint models as a version and make it champion.

Training logs each step it validated as an MLflow LoggedModel (pipelines/grpo/logged_models.py); those
whose weights were kept hold a peft adapter. Registering one:
1. finds it, by model id (`m-...`) or by step in the experiment's latest training run, and refuses
   one without weights, naming the steps that have them;
2. makes its folder a pyfunc model as `grpo register` does (`model_folder`: MLmodel and the
   stand-alone pyfunc_model.py beside the adapter, the base model the registered `<name>-reference`
   of the sha256 it trained on) and adds those files to the logged model's artifacts, so that the
   version and the logged model are the same files;
3. runs the export-parity check (pipelines/registry/parity.py: an adapter that changes nothing is
   refused before anything is added; the logged files, loaded from `models:/<model_id>` in a fresh
   process, must reproduce the adapter's log-probs) before any version exists;
4. creates the version from `models:/<model_id>` (versions.py, as `grpo register` does; the registry
   links them both ways), with the checkpoint's step, model id, validation figures and reference as
   tags, sets `challenger`, then
   moves `champion` to it through the manual path (promotion.promote: under the lock, who and why).

The gate is not asked: the version was never scored on the test split, and a person chose it.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from pipelines.config import Config
from pipelines.grpo import logged_models
from pipelines.mlflow_store import CHALLENGER, setup
from pipelines.paths import Paths
from pipelines.registry import parity, promotion, versions
from pipelines.registry.promotion import PromotionError
from pipelines.registry.stage import (
    example_question,
    expect_export,
    model_folder,
    name_model,
    prompt_template,
    pyfunc_config,
)
from pipelines.registry.versions import ensure_reference, reference_name

MODEL_ID = re.compile(r"m-[0-9a-f]+")
STEP = re.compile(r"(?:step-)?(\d+)")


def find(client: Any, experiment_id: str, which: str) -> Any:
    """The checkpoint model `which` names: a model id (`m-...`), or a step (`10`, `step-000010`) of the
    experiment's latest training run that logged checkpoint models."""
    import mlflow

    if MODEL_ID.fullmatch(which):
        try:
            model = client.get_logged_model(which)
        except mlflow.exceptions.MlflowException as exc:
            raise PromotionError(f"no logged model {which}: copy its id from the MLflow UI's Models tab") from exc
        if model.model_type != logged_models.MODEL_TYPE:
            raise PromotionError(
                f"logged model {which} is a {model.model_type or 'untyped'} model, not a training checkpoint "
                f"({logged_models.MODEL_TYPE}); register other models with mlflow.register_model"
            )
        return model
    step = STEP.fullmatch(which)
    if step is None:
        raise PromotionError(f"--checkpoint {which!r} is neither a step (10, step-000010) nor a model id (m-...)")
    latest = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"model_type = '{logged_models.MODEL_TYPE}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
        output_format="list",
    )
    if not latest:
        raise PromotionError(
            "no training checkpoints are logged in this experiment: train with MLflow logging and a validation "
            "split (`grpo train`, train.eval_every > 0 or the end of training), then promote one of its steps"
        )
    run_id = latest[0].source_run_id
    by_step = logged_models.existing(experiment_id, run_id)
    if int(step.group(1)) not in by_step:
        raise PromotionError(
            f"the latest training run {run_id} logged no checkpoint for step {int(step.group(1))}; it has "
            f"{_steps(by_step)}. Give one of those, or a model id (m-...) for another run's"
        )
    return by_step[int(step.group(1))]


def promote_checkpoint(
    client: Any,
    cfg: Config,
    paths: Paths,
    which: str,
    reason: str,
    user: str | None = None,
) -> dict[str, Any]:
    """Register checkpoint `which` as a new version of `registry.model_name`, `challenger`, then champion."""
    if not reason.strip():
        raise PromotionError("say why: grpo promote --checkpoint STEP --reason 'TEXT'")
    experiment_id = setup(paths.root, cfg.registry.experiment)
    model = find(client, experiment_id, which)
    step = model.tags.get(logged_models.STEP, "?")
    weights = model.tags.get(logged_models.WEIGHTS)
    if weights != logged_models.LOGGED:
        by_step = logged_models.existing(experiment_id, model.source_run_id)
        raise PromotionError(
            f"checkpoint step {step} ({model.model_id}) has no weights in MLflow ({weights or 'no weights tag'}); "
            f"its run has {_steps(by_step)}. Promote one with weights, or keep more checkpoints next time "
            "(-S train.keep_checkpoints=N, and checkpoint_every = eval_every)"
        )
    if str(model.status) != "READY":
        raise PromotionError(
            f"checkpoint step {step} ({model.model_id}) is {model.status}, not READY: its upload did not finish; "
            "rerun `grpo train` (it resumes at the end and completes it)"
        )
    name = cfg.registry.model_name
    reference_sha = model.tags.get("reference_sha256", "")
    reference_uri = _reference_uri(client, name, paths, reference_sha)
    with tempfile.TemporaryDirectory(prefix="grpo-checkpoint-") as tmp:
        folder, shipped = _pyfunc_folder(cfg, paths, model, reference_uri, reference_sha, Path(tmp))
        expected = _expect(cfg, paths, folder, reference_uri, reference_sha)  # a no-op adapter stops here
        for item in sorted(folder.iterdir()):
            if item.name in shipped:
                continue
            if item.is_dir():
                client.log_model_artifacts(model.model_id, str(item), item.name)
            else:
                client.log_model_artifact(model.model_id, str(item))
    if expected is not None:
        try:
            report = parity.check(expected, f"models:/{model.model_id}")
        except parity.ParityError as exc:
            client.set_logged_model_tags(model.model_id, {"export_parity": f"failed: {exc}"[:4000]})
            raise PromotionError(f"export-parity check failed, nothing registered: {exc}") from exc
        client.set_logged_model_tags(model.model_id, {"export_parity": report.summary()})
    version = _create_version(client, name, model, reference_uri, reference_sha)
    client.set_registered_model_alias(name, CHALLENGER, version)
    done = promotion.promote(client, name, version, reason, user)
    return {**done, "version": version, "step": step, "model_id": model.model_id, "run_id": model.source_run_id,
            "validation": validation_figures(model)}  # fmt: skip


def validation_figures(model: Any) -> dict[str, float]:
    """The model's latest validation figures (`eval/accuracy` -> `accuracy`), timings left out."""
    latest: dict[str, Any] = {}
    for metric in model.metrics or []:
        known = latest.get(metric.key)
        if known is None or (metric.step, metric.timestamp) > (known.step, known.timestamp):
            latest[metric.key] = metric
    return {k.removeprefix("eval/"): m.value for k, m in sorted(latest.items()) if k != "eval/seconds"}


def _steps(by_step: dict[int, Any]) -> str:
    """'steps 5, 10, 15 (with weights: 10, 15)'."""
    if not by_step:
        return "no checkpoint models"
    kept = [s for s, m in sorted(by_step.items()) if m.tags.get(logged_models.WEIGHTS) == logged_models.LOGGED]
    return f"steps {', '.join(map(str, sorted(by_step)))} (with weights: {', '.join(map(str, kept)) or 'none'})"


def _expect(cfg: Config, paths: Paths, folder: Path, reference_uri: str, sha256: str) -> parity.Expected | None:
    """The checkpoint adapter's log-probs on the probe texts (None when registry.export_check is off)."""
    import mlflow

    if not cfg.registry.export_check:
        return None  # not even the reference's download
    manifest = paths.reference_dir / "manifest.json"
    local = manifest.exists() and json.loads(manifest.read_text())["sha256"] == sha256
    base = paths.reference_dir if local else Path(mlflow.artifacts.download_artifacts(reference_uri))
    try:
        return expect_export(cfg, paths, folder, base)
    except parity.ParityError as exc:
        raise PromotionError(f"export-parity check failed, nothing registered: {exc}") from exc


def _reference_uri(client: Any, name: str, paths: Paths, sha256: str) -> str:
    """`models:/<name>-reference/<version>` of the reference the checkpoint trained on: registered now from
    models/reference when that is the one, else one registered earlier."""
    import mlflow

    ref = reference_name(name)
    manifest = paths.reference_dir / "manifest.json"
    local = json.loads(manifest.read_text())["sha256"] if manifest.exists() else None
    if sha256 and local == sha256:
        return f"models:/{ref}/{ensure_reference(client, ref, paths.reference_dir, sha256)}"
    try:
        found = [v for v in client.search_model_versions(f"name='{ref}'") if v.tags.get("sha256") == sha256]
    except mlflow.exceptions.MlflowException:
        found = []
    if not sha256 or not found:
        raise PromotionError(
            f"the checkpoint was trained on the reference with sha256 {sha256[:12] or '?'}, which is neither in "
            f"{paths.reference_dir} nor registered as {ref}: run `grpo snapshot` for that model first"
        )
    return f"models:/{ref}/{found[0].version}"


def _pyfunc_folder(
    cfg: Config, paths: Paths, model: Any, reference_uri: str, reference_sha: str, tmp: Path
) -> tuple[Path, set[str]]:
    """(the checkpoint as a local pyfunc + peft folder, the names its logged model already holds)."""
    import mlflow

    adapter = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}", dst_path=str(tmp / "logged")))
    shipped = {p.name for p in adapter.iterdir()}
    if "MLmodel" in shipped:  # registered before: already a pyfunc model, and a version's files never change
        return adapter, shipped
    config = pyfunc_config(cfg, paths, reference_uri, reference_sha)
    example = example_question(paths, prompt_template(cfg, paths).instruction or "{question}")
    folder = model_folder(adapter, tmp / "pyfunc", config, example)
    name_model(folder, model)
    return folder, shipped


def _create_version(client: Any, name: str, model: Any, reference_uri: str, reference_sha: str) -> str:
    """Version checkpoint `model` as `name`, with its step, validation figures and lineage as tags; the version."""
    import mlflow

    step = model.tags.get(logged_models.STEP, "?")
    try:
        run_tags = client.get_run(model.source_run_id).data.tags
    except mlflow.exceptions.MlflowException:
        run_tags = {}
    tags = {
        "registered_from": "checkpoint",
        "checkpoint_step": step,
        "checkpoint_model_id": model.model_id,
        "checkpoint_selected": model.tags.get(logged_models.SELECTED, "?"),
        "training_run_id": model.source_run_id,
        "reference_model_uri": reference_uri,
        "reference_sha256": reference_sha,
        "dataset_digest": model.tags.get("dataset_digest", "?"),
        "git_commit": run_tags.get("mlflow.source.git.commit", "?"),
        **{f"validation_{k.replace('/', '_')}": f"{v:.6g}" for k, v in validation_figures(model).items()},
    }
    description = (
        f"Checkpoint step {step} of training run {model.source_run_id} (logged model {model.model_id}), "
        f"registered by `grpo promote --checkpoint`: LoRA adapter (peft format) for the base model at "
        f"{reference_uri}, and an MLflow pyfunc model. Scored on the validation split only (validation_* tags)."
    )
    version = versions.create_version(client, name, model, model.source_run_id, tags, description)
    versions.list_version(client, name, version)
    return str(version.version)
