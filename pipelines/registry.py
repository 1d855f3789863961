"""Stage 5, register: log the run to MLflow, register the policy, move the aliases.

Every new version gets `challenger`; `champion` moves only when the candidate beats the current
champion's held-out accuracy (no champion yet: it becomes one). Alias moves are single registry
calls, so a crash leaves either the old champion or the new one, never none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import lineage
from pipelines.config import Config
from pipelines.io import write_json
from pipelines.paths import Paths
from pipelines.tracking import flatten, setup

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass
class RegisterResult:
    name: str
    version: str
    promoted: bool
    reason: str
    run_id: str


def reference_name(model_name: str) -> str:
    return f"{model_name}-reference"


def ensure_reference(client: Any, name: str, folder: Path, sha256: str) -> str:
    """The registry version holding this exact reference (logged once per sha256)."""
    import mlflow

    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="Pinned reference (base) models for the GRPO policies.")
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get("sha256") == sha256:
            return version.version
    with mlflow.start_run(run_name=f"reference-{sha256[:12]}", nested=mlflow.active_run() is not None) as run:
        mlflow.log_artifacts(str(folder), "reference")
        mlflow.set_tag("reference_sha256", sha256)
    made = client.create_model_version(name, source=f"{run.info.artifact_uri}/reference", run_id=run.info.run_id, tags={"sha256": sha256})
    return made.version


def current_champion(client: Any, name: str) -> Any | None:
    import mlflow

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def decide(candidate_accuracy: float, champion: Any | None, min_gain: float) -> tuple[bool, str]:
    """(promote?, why) for a candidate against the current champion's recorded accuracy."""
    if champion is None:
        return True, "no champion yet"
    recorded = champion.tags.get("eval_accuracy")
    if recorded is None:
        return True, f"champion v{champion.version} has no recorded eval_accuracy"
    best = float(recorded)
    if candidate_accuracy >= best + min_gain and candidate_accuracy > best:
        return True, f"accuracy {candidate_accuracy:.3f} beats champion v{champion.version} ({best:.3f}) by >= {min_gain}"
    return False, f"accuracy {candidate_accuracy:.3f} does not beat champion v{champion.version} ({best:.3f}) by more than {min_gain}"


def run(cfg: Config, paths: Paths) -> RegisterResult:
    import mlflow
    from mlflow import MlflowClient

    name = cfg.registry.model_name
    setup(paths.root, cfg.registry.experiment)
    client = MlflowClient()
    train = json.loads(paths.train_metrics.read_text())
    evaluation = json.loads(paths.eval_metrics.read_text())
    manifest = json.loads((paths.reference_dir / "manifest.json").read_text())
    tags = lineage.collect(cfg, paths)

    run_id = train.get("mlflow_run_id")
    try:
        if run_id:
            client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        run_id = None  # e.g. `dvc repro` in a clone without the training run's store
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "grpo-register") as run:
        if not run_id:
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.model_dump()).items()})
        for model, figures in (("reference", evaluation["reference"]), ("policy", evaluation["policy"])):
            mlflow.log_metrics({f"eval/{model}/{k}": float(v) for k, v in figures.items()})
        mlflow.set_tags(tags)
        mlflow.log_artifacts(str(paths.policy_dir), "policy")
        for report in (paths.eval_report, paths.eval_samples, paths.validation_report, paths.train_plot, paths.train_metrics):
            if report.exists():
                mlflow.log_artifact(str(report), "reports")
        reference_version = ensure_reference(client, reference_name(name), paths.reference_dir, manifest["sha256"])

    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="GRPO-trained LoRA adapters; base model in the -reference model.")
    accuracy = float(evaluation["policy"]["accuracy"])
    version_tags = {
        **tags,
        "eval_accuracy": f"{accuracy:.6f}",
        "eval_reference_accuracy": f"{evaluation['reference']['accuracy']:.6f}",
        "eval_format_rate": f"{evaluation['policy']['format_rate']:.6f}",
        "reference_model_uri": f"models:/{reference_name(name)}/{reference_version}",
    }
    champion = current_champion(client, name)
    promote, reason = decide(accuracy, champion, cfg.registry.min_gain)
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/policy",
        run_id=run.info.run_id,
        tags=version_tags,
        description=(
            "LoRA adapter (peft format) for the base model at "
            f"models:/{reference_name(name)}/{reference_version}. Load with transformers + peft: "
            "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)."
        ),
    )
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    client.set_model_version_tag(name, version.version, "promotion", ("promoted: " if promote else "kept: ") + reason)
    result = RegisterResult(name=name, version=str(version.version), promoted=promote, reason=reason, run_id=run.info.run_id)
    write_json(paths.registry_metrics, {**result.__dict__, "eval_accuracy": accuracy})
    return result


def download(name: str, alias: str, dest: Path) -> tuple[Path, Path]:
    """(base model folder, adapter folder) of `name@alias`, fetched from the registry."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    version = client.get_model_version_by_alias(name, alias)
    adapter = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{alias}", dst_path=str(dest / "adapter")))
    base = Path(mlflow.artifacts.download_artifacts(version.tags["reference_model_uri"], dst_path=str(dest / "base")))
    return base, adapter
