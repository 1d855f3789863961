"""Stage 5, register: log the run to MLflow, register the policy, let the gate move the aliases.

A version's folder is at once a peft adapter (adapter_config.json, adapter_model.safetensors and the
tokenizer, for `PeftModel.from_pretrained`) and an MLflow pyfunc model (MLmodel + the stand-alone
pipelines/registry/pyfunc_model.py, for `mlflow.pyfunc.load_model`); its base is the pinned reference,
registered once per sha256 as `<name>-reference`. Neither way of loading needs this project.

Every new version gets `challenger`. `champion` moves only when the promotion gate
(pipelines/registry/gate.py) holds on the paired evaluation of metrics/eval.json (with no champion
yet, the candidate must beat the reference); see pipelines/registry/promotion.py for how the alias
moves (under a registry-wide lock, read back afterwards) and how it is rolled back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines.config import Config
from pipelines.hashing import folder_sha256
from pipelines.io import read_jsonl, write_json
from pipelines.mlflow_store import CHALLENGER, flatten, setup
from pipelines.paths import Paths
from pipelines.registry import gate, lineage, promotion

# What loading a version needs: pinned to the versions that produced it (the default requirements
# MLflow infers ask for torchvision, which is neither needed nor installable everywhere).
RUNTIME_PACKAGES = ("mlflow", "torch", "transformers", "peft", "safetensors")


class RegistryError(RuntimeError):
    """The files to register do not match what was evaluated; the message says which stage to rerun."""


@dataclass
class RegisterResult:
    name: str
    version: str
    promoted: bool
    reason: str
    run_id: str
    champion_before: str | None = None
    champion: str | None = None
    checks: dict[str, bool] = field(default_factory=dict)


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
    made = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/reference", run_id=run.info.run_id, tags={"sha256": sha256}
    )
    return made.version


def pip_requirements() -> list[str]:
    """`package==version` for what loading needs, as installed here (local build tags dropped)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in RUNTIME_PACKAGES]


def model_folder(policy_dir: Path, dest: Path, model_config: dict[str, Any]) -> Path:
    """A folder that is both the peft adapter and an MLflow pyfunc model (see the module docstring)."""
    import mlflow

    from pipelines.registry import pyfunc_model

    mlflow.pyfunc.save_model(
        path=str(dest),
        python_model=pyfunc_model.__file__,
        model_config=model_config,
        pip_requirements=pip_requirements(),
    )
    for item in policy_dir.iterdir():
        if (dest / item.name).exists():
            raise RegistryError(f"{policy_dir / item.name} would overwrite MLflow's own {item.name}; rename it")
        if item.is_file():
            shutil.copy2(item, dest / item.name)
    return dest


def load_evidence(paths: Paths, evaluation: dict[str, Any], champion_now: str | None) -> gate.Evidence | str:
    """The gate's per-problem evidence, or why there is none that fits the registry as it is now."""
    evaluated = evaluation.get("champion_version")
    if champion_now is not None and champion_now != evaluated:
        scored = f"v{evaluated}" if evaluated else "no champion"
        return (
            f"champion is v{champion_now} but metrics/eval.json scored {scored}: run `grpo evaluate` again so that "
            "the gate compares both on the same problems"
        )
    by_model: dict[str, dict[str, bool]] = {}
    lenient: dict[str, dict[str, bool]] = {}
    for row in read_jsonl(paths.eval_samples):
        by_model.setdefault(row["model"], {})[row["id"]] = bool(row["correct"])
        lenient.setdefault(row["model"], {})[row["id"]] = bool(row.get("last_number_correct", False))
    ids = list(by_model.get("policy", {}))
    try:
        return gate.Evidence(
            candidate=[by_model["policy"][i] for i in ids],
            reference=[by_model["reference"][i] for i in ids],
            champion=[by_model["champion"][i] for i in ids] if champion_now is not None else None,
            candidate_format_rate=float(evaluation["policy"]["format_rate"]),
            champion_version=champion_now,
            candidate_lenient=[lenient["policy"][i] for i in ids],
            reference_lenient=[lenient["reference"][i] for i in ids],
        )
    except KeyError as exc:
        raise RegistryError(f"{paths.eval_samples} lacks outcomes for {exc}; run `grpo evaluate` again") from exc


def eval_tags(evaluation: dict[str, Any]) -> dict[str, str]:
    """The evaluation figures a version carries: its own, the reference's, the champion's, the gains."""
    policy, ref = evaluation["policy"], evaluation["reference"]
    tags = {f"eval_{key}": f"{value:.6g}" for key, value in policy.items()}
    tags["eval_reference_accuracy"] = f"{ref['accuracy']:.6g}"
    tags["eval_confidence"] = str(evaluation.get("settings", {}).get("confidence", ""))
    for other in ("reference", "champion"):
        comp = (evaluation.get("comparison") or {}).get(f"policy_vs_{other}")
        if comp:
            tags[f"eval_gain_vs_{other}"] = f"{comp['diff']:+.6g}"
            tags[f"eval_gain_vs_{other}_ci"] = f"[{comp['ci_low']:+.4f}, {comp['ci_high']:+.4f}]"
            tags[f"eval_mcnemar_p_vs_{other}"] = f"{comp['mcnemar']['p_value']:.4g}"
    if evaluation.get("champion"):
        tags["eval_champion_version"] = str(evaluation["champion_version"])
        tags["eval_champion_accuracy"] = f"{evaluation['champion']['accuracy']:.6g}"
    return tags


def run(cfg: Config, paths: Paths) -> RegisterResult:
    import mlflow
    from mlflow import MlflowClient

    name = cfg.registry.model_name
    train = json.loads(paths.train_metrics.read_text())
    evaluation = json.loads(paths.eval_metrics.read_text())
    manifest = json.loads((paths.reference_dir / "manifest.json").read_text())
    # The figures and the gate's evidence must be about the very files being registered.
    if evaluation.get("candidate_sha256") != folder_sha256(paths.policy_dir):
        raise RegistryError(
            f"{paths.policy_dir} is not the adapter {paths.eval_metrics} was computed on; run `grpo evaluate` first"
        )
    if evaluation.get("reference_sha256") != manifest["sha256"]:
        raise RegistryError(
            f"{paths.reference_dir} changed since {paths.eval_metrics} was written; run `grpo evaluate` first"
        )
    setup(paths.root, cfg.registry.experiment)
    client = MlflowClient()

    champion = promotion.current_champion(client, name)
    champion_before = str(champion.version) if champion is not None else None
    evidence = load_evidence(paths, evaluation, champion_before)
    decision = (
        gate.decide(evidence, cfg.registry, cfg.evaluate)
        if isinstance(evidence, gate.Evidence)
        else gate.Decision(False, evidence)
    )
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
        for model in ("reference", "policy", "champion"):
            figures = evaluation.get(model) or {}
            mlflow.log_metrics({f"eval/{model}/{k}": float(v) for k, v in figures.items()})
        mlflow.set_tags(tags)
        for report in (
            paths.eval_report,
            paths.eval_chart,
            paths.eval_samples,
            paths.validation_report,
            paths.train_plot,
            paths.train_metrics,
            paths.eval_metrics,
        ):
            if report.exists():
                mlflow.log_artifact(str(report), "reports")
        reference_version = ensure_reference(client, reference_name(name), paths.reference_dir, manifest["sha256"])
        reference_uri = f"models:/{reference_name(name)}/{reference_version}"
        model_config = {
            "reference_model_uri": reference_uri,
            "reference_sha256": manifest["sha256"],
            "base_path": "",  # set at load time to use a local copy of the reference instead
            "max_new_tokens": cfg.evaluate.max_new_tokens,
            "prompt": cfg.data.prompt.model_dump(),
        }
        # A run registered again (after a new evaluation) gets a new folder: a version's files never change.
        taken = {a.path for a in client.list_artifacts(run.info.run_id)}
        artifact_path = next(p for p in ("policy", *(f"policy-{i}" for i in range(2, 10_000))) if p not in taken)
        with tempfile.TemporaryDirectory(prefix="grpo-register-") as tmp:
            mlflow.log_artifacts(str(model_folder(paths.policy_dir, Path(tmp) / "policy", model_config)), artifact_path)

    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(
            name,
            description="GRPO-trained LoRA adapters (peft format + MLflow pyfunc); base model in the -reference model.",
        )
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{artifact_path}",
        run_id=run.info.run_id,
        tags={**tags, **eval_tags(evaluation), "reference_model_uri": reference_uri},
        description=(
            f"LoRA adapter (peft format) for the base model at {reference_uri}, and an MLflow pyfunc model. Load with "
            "mlflow.pyfunc.load_model(uri).predict([question]), or with transformers + peft: "
            "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)."
        ),
    )
    v = str(version.version)
    client.set_registered_model_alias(name, CHALLENGER, v)
    promoted = decision.promote
    reason = decision.reason

    def decision_tags() -> dict[str, str]:
        return {
            "promotion": (("promoted: " if promoted else "kept: ") + reason)[:4000],
            "promotion_decision": "promoted" if promoted else "kept",
            "promotion_reason": reason[:4000],
            "promotion_checks": json.dumps(decision.checks, sort_keys=True),
        }

    if promoted:
        # Under the registry-wide lock (another workspace, or a person, may be moving it too): the
        # gate judged against `champion_before`; if the alias moved meanwhile, that judgement no
        # longer applies.
        with promotion.champion_lock(client, name):
            now = promotion.current_champion(client, name)
            if (str(now.version) if now is not None else None) != champion_before:
                promoted, reason = (
                    False,
                    f"champion moved to v{now.version if now else '-'} during registration; evaluate again",
                )
            else:
                promotion.move_champion(
                    client,
                    name,
                    v,
                    champion_before,
                    {**decision_tags(), "promoted_by": "gate", "promoted_at": promotion.now()},
                )
    if not promoted:
        for key, value in decision_tags().items():
            client.set_model_version_tag(name, v, key, value)
    result = RegisterResult(
        name=name,
        version=v,
        promoted=promoted,
        reason=reason,
        run_id=run.info.run_id,
        champion_before=champion_before,
        champion=v if promoted else champion_before,
        checks=decision.checks,
    )
    write_json(
        paths.registry_metrics,
        {
            **result.__dict__,
            "eval_accuracy": float(evaluation["policy"]["accuracy"]),
            "figures": decision.figures,
            "challenger": v,
        },
    )
    return result
