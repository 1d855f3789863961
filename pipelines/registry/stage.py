"""Stage 5, register: log the run to MLflow, register the policy, let the gate move the aliases.

A version's folder is at once a peft adapter (adapter_config.json, adapter_model.safetensors and the
tokenizer, for `PeftModel.from_pretrained`) and an MLflow pyfunc model (MLmodel + the stand-alone
pipelines/registry/pyfunc_model.py, for `mlflow.pyfunc.load_model`); its base is the pinned reference,
registered once per sha256 as `<name>-reference`. Neither way of loading needs this project.

Every new version gets `challenger`. `champion` moves only when the promotion gate
(pipelines/registry/gate.py) holds on the paired evaluation of reports/eval.json (with no champion
yet, the candidate must beat the reference); see pipelines/registry/promotion.py for how the alias
moves (under a registry-wide lock, read back afterwards) and how it is rolled back.

A version is made from a LoggedModel (`models:/<model_id>`), so that the registry and the experiment's
Models tab name the same model: the training run's checkpoint model that holds exactly the evaluated
adapter weights (its `weights_sha256`, pipelines/grpo/logged_models.py), which the evaluated folder's
other files (tokenizer, config) and the pyfunc files are added to;
or, when there is none (no MLflow training run, or checkpoints logged without weights), a new `policy`
model of the run holding models/policy.

The run gets the held-out accuracies as one-point `test/<model>/accuracy` metrics (and the gains), every
other test figure in a `test-figures.json` table, and a paragraph of its description. The version gets
the tags a reader looks it up by (lineage.VERSION_TAGS: `eval_*` headline figures, lineage, decision);
its whole record is the JSON its `lineage` tag names.

`run` is five steps, each a function below: load, judge (the gate), register, set_aliases, report.
Registered models and versions are made in pipelines/registry/versions.py, shared with checkpoint promotion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines.config import Config, PromptConfig
from pipelines.data.prompts import task_prompt
from pipelines.hashing import file_hash, folder_sha256
from pipelines.io import read_jsonl, write_json
from pipelines.mlflow_store import CHALLENGER, alias_version, flatten, is_absent, setup
from pipelines.paths import Paths
from pipelines.registry import gate, lineage, parity, promotion, pyfunc_model, versions
from pipelines.registry.versions import ensure_reference, list_version, reference_name
from pipelines.source import mlflow_source_tags
from pipelines.verifiers import catalog

log = logging.getLogger(__name__)

# MLflow's key for a run's description.
NOTE = "mlflow.note.content"

# What loading a version needs: pinned to the versions that produced it (the default requirements
# MLflow infers ask for torchvision, which is neither needed nor installable everywhere).
RUNTIME_PACKAGES = ("mlflow", "torch", "transformers", "peft", "safetensors")
# The type of the LoggedModel a registration makes when no checkpoint model holds the evaluated adapter.
POLICY_MODEL_TYPE = "grpo-policy"
# Training's checkpoint models (pipelines/grpo/logged_models.py, not imported here: it would make every
# training module a dependency of the register stage): their type, the tags read here, the weights file.
CHECKPOINT_TYPE = "grpo-checkpoint"
WEIGHTS_SHA256, STEP, SELECTED = "weights_sha256", "step", "selected"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Test figures rounded to this many decimals in the run's table (the paired statistics keep theirs).
DECIMALS = 3


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


def pip_requirements() -> list[str]:
    """`package==version` for what loading needs, as installed here (local build tags dropped)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in RUNTIME_PACKAGES]


def model_folder(policy_dir: Path, dest: Path, model_config: dict[str, Any], example: str | None = None) -> Path:
    """A folder that is both the peft adapter and an MLflow pyfunc model (see the module docstring), with its
    signature (questions in, answers out, an optional `max_new_tokens`) and `example` as its input example."""
    import mlflow

    mlflow.pyfunc.save_model(
        path=str(dest),
        python_model=pyfunc_model.__file__,
        model_config=model_config,
        pip_requirements=pip_requirements(),
        signature=pyfunc_model.signature(),
        input_example=[example or pyfunc_model.EXAMPLE_QUESTION],
    )
    for item in policy_dir.iterdir():
        if (dest / item.name).exists():
            raise RegistryError(f"{policy_dir / item.name} would overwrite MLflow's own {item.name}; rename it")
        if item.is_file():
            shutil.copy2(item, dest / item.name)
    return dest


def pyfunc_config(cfg: Config, paths: Paths, reference_uri: str, reference_sha256: str) -> dict[str, Any]:
    """The pyfunc model's `model_config`: its base (the registered reference), answer length and prompt."""
    return {
        "reference_model_uri": reference_uri,
        "reference_sha256": reference_sha256,
        "base_path": "",  # set at load time to use a local copy of the reference instead
        "max_new_tokens": cfg.evaluate.max_new_tokens,
        "prompt": prompt_template(cfg, paths).model_dump(),
    }


def name_model(folder: Path, model: Any) -> None:
    """The MLmodel names the logged model and run it belongs to, as mlflow's own log_model writes it."""
    from mlflow.models import Model

    mlmodel = Model.load(str(folder))
    mlmodel.model_id, mlmodel.run_id = model.model_id, model.source_run_id
    mlmodel.artifact_path = model.artifact_location
    mlmodel.save(str(folder / "MLmodel"))


def prompt_template(cfg: Config, paths: Paths) -> PromptConfig:
    """The template the policy was trained with: data.prompt, with what it leaves null from the task."""
    return task_prompt(cfg.data.prompt, catalog.load(cfg.task, paths.root))


def test_questions(paths: Paths, instruction: str, n: int = 1) -> list[str]:
    """Up to `n` questions as the pyfunc model takes them (plain text): the first test problems', out of
    their instruction.

    Empty when the test split cannot be read; the prompt's last user turn as it is when it does not follow
    the instruction template (rows that came as chat messages).
    """
    try:
        rows = read_jsonl(paths.eval_split)[:n]
    except (OSError, ValueError):
        return []
    before, _, after = instruction.partition("{question}")
    questions = []
    for row in rows:
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            turns = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
            prompt = turns[-1] if turns else ""
        text = str(prompt or "")
        if "{question}" in instruction and text.startswith(before) and text.endswith(after):
            text = text[len(before) : len(text) - len(after)]
        if text.strip():
            questions.append(text.strip())
    return questions


def example_question(paths: Paths, instruction: str) -> str | None:
    """The first test question (see test_questions), or None."""
    return next(iter(test_questions(paths, instruction)), None)


def held_out_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """The held-out figures a run charts: `test/<model>/accuracy`, `test/gain_vs_<other>` and the judge's disagreement.

    Each is one point, which MLflow draws as a bar chart the height of a training curve's: a chart per
    figure (23 of them) pushed the training curves out of sight, so the rest are in held_out_table.

    >>> held_out_metrics({"policy": {"accuracy": 0.5, "pass_at_k": 0.7}, "reference": {"accuracy": 0.25}})
    {'test/reference/accuracy': 0.25, 'test/policy/accuracy': 0.5}
    """
    metrics = {
        f"test/{model}/accuracy": float(evaluation[model]["accuracy"])
        for model in ("reference", "policy", "champion")
        if (evaluation.get(model) or {}).get("accuracy") is not None
    }
    for other in ("reference", "champion"):
        comparison = (evaluation.get("comparison") or {}).get(f"policy_vs_{other}")
        if comparison:
            metrics[f"test/gain_vs_{other}"] = float(comparison["diff"])
    agreement = evaluation.get("agreement") or {}
    if agreement.get("checked"):  # the judge vs training's correctness reward (evaluation/agreement.py)
        metrics["test/judge_reward_disagreement"] = float(agreement["share"])
    return metrics


def held_out_table(evaluation: dict[str, Any]) -> dict[str, list[Any]]:
    """Every held-out figure, a row per scored model, rounded to DECIMALS (the run's `test-figures.json` table).

    >>> held_out_table({"reference": {"accuracy": 0.25, "k": 4}, "policy": {"accuracy": 0.5000001, "k": 4}})
    {'model': ['reference', 'policy'], 'accuracy': [0.25, 0.5], 'k': [4, 4]}
    """
    scored = [(m, evaluation[m]) for m in ("reference", "policy", "champion") if evaluation.get(m)]
    keys = list(dict.fromkeys(k for _, figures in scored for k in figures))
    table: dict[str, list[Any]] = {"model": [m for m, _ in scored]}
    for key in keys:
        table[key] = [_rounded(figures.get(key)) for _, figures in scored]
    return table


def _rounded(value: Any) -> Any:
    return round(value, DECIMALS) if isinstance(value, float) else value


def describe_registration(evaluation: dict[str, Any], name: str, version: str, promoted: bool, reason: str) -> str:
    """The paragraph the run's description gets for its registration: test figures and the decision."""
    policy, reference = evaluation["policy"], evaluation["reference"]
    comparison = (evaluation.get("comparison") or {}).get("policy_vs_reference") or {}
    interval = f", interval [{comparison['ci_low']:+.3f}, {comparison['ci_high']:+.3f}]" if comparison else ""
    lines = [
        REGISTRATION_MARK,
        "",
        f"- **test split** ({int(policy.get('problems', 0))} problems): accuracy {policy['accuracy']:.3f} vs reference "
        f"{reference['accuracy']:.3f} (gain {policy['accuracy'] - reference['accuracy']:+.3f}{interval}); lenient "
        f"{policy.get('lenient_accuracy', float('nan')):.3f}, pass@k {policy.get('pass_at_k', float('nan')):.3f}, "
        f"format {policy.get('format_rate', float('nan')):.3f}",
    ]
    if evaluation.get("champion"):
        lines.append(
            f"- **champion v{evaluation.get('champion_version')}** re-scored: accuracy "
            f"{evaluation['champion']['accuracy']:.3f}"
        )
    verdict = "**promoted** to champion" if promoted else "**kept** as challenger"
    lines.append(f"- **`{name}` v{version}**: {verdict}: {reason}")
    return "\n".join(lines)


# Where the registration's paragraph starts in the run's description (a new registration replaces it).
REGISTRATION_MARK = "**Registration**"


def load_evidence(paths: Paths, evaluation: dict[str, Any], champion_now: str | None) -> gate.Evidence | str:
    """The gate's per-problem evidence, or why there is none that fits the registry as it is now."""
    evaluated = evaluation.get("champion_version")
    if champion_now is not None and champion_now != evaluated:
        scored = f"v{evaluated}" if evaluated else "no champion"
        return (
            f"champion is v{champion_now} but reports/eval.json scored {scored}: run `grpo evaluate` again so that "
            "the gate compares both on the same problems"
        )
    by_model: dict[str, dict[str, bool]] = {}
    lenient: dict[str, dict[str, bool]] = {}
    for row in read_jsonl(paths.eval_samples):
        by_model.setdefault(row["model"], {})[row["id"]] = bool(row["correct"])
        lenient.setdefault(row["model"], {})[row["id"]] = bool(
            row.get("lenient", row.get("last_number_correct", False))
        )
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
            judge_disagreements=_disagreements(evaluation.get("agreement")),
        )
    except KeyError as exc:
        raise RegistryError(f"{paths.eval_samples} lacks outcomes for {exc}; run `grpo evaluate` again") from exc


def _disagreements(agreement: dict[str, Any] | None) -> tuple[int, int] | None:
    if not agreement or not agreement.get("checked"):
        return None
    return int(agreement["disagreements"]), int(agreement["checked"])


def eval_tags(evaluation: dict[str, Any]) -> dict[str, str]:
    """The evaluation figures a version carries: its own, the reference's, the champion's, the gains."""
    policy, ref = evaluation["policy"], evaluation["reference"]
    tags = {f"eval_{key}": f"{value:.6g}" for key, value in policy.items()}
    tags["eval_reference_accuracy"] = f"{ref['accuracy']:.6g}"
    confidence = (evaluation.get("settings") or {}).get("confidence")
    if confidence is not None:
        tags["eval_confidence"] = str(confidence)
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


def verifier_tags(*records: dict[str, Any]) -> dict[str, str]:
    """`verifier_<name>_sha256` for the verifiers that trained and evaluated the version (their "verifiers")."""
    return {f"verifier_{k}_sha256": v for record in records for k, v in (record.get("verifiers") or {}).items()}


def expect_export(cfg: Config, paths: Paths, adapter_dir: Path, reference_dir: Path) -> parity.Expected | None:
    """The log-probs the logged version of `adapter_dir` must reproduce, on up to 3 test questions (None
    when registry.export_check is off); ParityError at once for an adapter that does not change its base."""
    if not cfg.registry.export_check:
        return None
    from pipelines.device import resolve as resolve_device

    template = prompt_template(cfg, paths)
    return parity.expect(
        reference_dir,
        adapter_dir,
        template.model_dump(),
        test_questions(paths, template.instruction or "{question}", n=3) or [pyfunc_model.EXAMPLE_QUESTION],
        cfg.registry.export_atol,
        cfg.snapshot.trust_remote_code,
        str(resolve_device(cfg.runtime.device)),
    )


def verify_export(expected: parity.Expected | None, model_id: str, run_id: str) -> parity.ParityReport | None:
    """The export-parity check on logged model `model_id`'s files; its result is tagged on the run and the model,
    and a failure raised as RegistryError before any version exists."""
    from mlflow import MlflowClient

    if expected is None:
        return None
    client = MlflowClient()
    try:
        report = parity.check(expected, f"models:/{model_id}")
    except parity.ParityError as exc:
        client.set_tag(run_id, "export_parity", f"failed: {exc}"[:4000])
        client.set_logged_model_tags(model_id, {"export_parity": f"failed: {exc}"[:4000]})
        raise RegistryError(f"export-parity check failed, nothing registered: {exc}") from exc
    client.set_tag(run_id, "export_parity", report.summary())
    client.set_logged_model_tags(model_id, {"export_parity": report.summary()})
    return report


@dataclass
class Registration:
    """What `load` gathers for the steps after it: the evaluated files' records, the export check's
    expectation, the registry and its champion, and the version an earlier try of this registration made."""

    name: str
    client: Any
    train: dict[str, Any]
    evaluation: dict[str, Any]
    manifest: dict[str, Any]
    expected: parity.Expected | None
    champion: Any | None  # the champion version the gate judges against, None if there is none yet
    key: str  # registration_key
    existing: Any | None  # the version made by an earlier try (a retried task, a rerun), None if none

    @property
    def champion_before(self) -> str | None:
        return str(self.champion.version) if self.champion is not None else None


def run(cfg: Config, paths: Paths) -> RegisterResult:
    """Register models/policy as `grpo evaluate` scored it, and let the gate move the aliases."""
    reg = load(cfg, paths)
    if reg.existing is not None and _complete(reg.existing, reg.champion_before):
        # Registered and decided before (the task is retried, or run again): report it, change nothing.
        return _finished(reg.client, paths, reg.name, reg.existing, reg.champion_before, reg.evaluation)
    decision = judge(cfg, paths, reg)
    version, run_id = register(cfg, paths, reg, decision)
    decision = set_aliases(reg, version, decision)
    return report(paths, reg, version, run_id, decision)


def load(cfg: Config, paths: Paths) -> Registration:
    """Step 1: the training and evaluation reports, checked to be about the very files being registered
    (RegistryError names the stage to rerun); then the registry, its champion and this registration's key."""
    from mlflow import MlflowClient

    train = _read(paths.train_summary, "train")
    evaluation = _read(paths.eval_results, "evaluate")
    manifest = json.loads((paths.reference_dir / "manifest.json").read_text())
    # The figures and the gate's evidence must be about the very files being registered.
    if evaluation.get("candidate_sha256") != folder_sha256(paths.policy_dir):
        raise RegistryError(
            f"{paths.policy_dir} is not the adapter {paths.eval_results} was computed on; run `grpo evaluate` first"
        )
    if evaluation.get("reference_sha256") != manifest["sha256"]:
        raise RegistryError(
            f"{paths.reference_dir} changed since {paths.eval_results} was written; run `grpo evaluate` first"
        )
    try:  # before anything is logged: an adapter that changes nothing is refused here
        expected = expect_export(cfg, paths, paths.policy_dir, paths.reference_dir)
    except parity.ParityError as exc:
        raise RegistryError(f"export-parity check failed, nothing registered: {exc}") from exc
    setup(paths.root, cfg.registry.experiment)
    client = MlflowClient()
    name = cfg.registry.model_name
    champion = promotion.current_champion(client, name)
    key = registration_key(paths, evaluation, train.get("mlflow_run_id"))
    existing = find_registration(client, name, key)
    return Registration(name, client, train, evaluation, manifest, expected, champion, key, existing)


def judge(cfg: Config, paths: Paths, reg: Registration) -> gate.Decision:
    """Step 2, the gate: its decision on the paired per-problem outcomes, against the champion as it is now."""
    evidence = load_evidence(paths, reg.evaluation, reg.champion_before)
    if not isinstance(evidence, gate.Evidence):
        return gate.Decision(False, evidence)
    if reg.champion is not None:  # were its scores by other verifier code?
        champion_verifiers = {k[len("verifier_") : -len("_sha256")]: v for k, v in (reg.champion.tags or {}).items()
                              if k.startswith("verifier_") and k.endswith("_sha256")}  # fmt: skip
        evidence = replace(
            evidence, verifiers=reg.evaluation.get("verifiers"), champion_verifiers=champion_verifiers or None
        )
    return gate.decide(evidence, cfg.registry, cfg.evaluate)


def register(cfg: Config, paths: Paths, reg: Registration, decision: gate.Decision) -> tuple[str, str]:
    """Step 3: (version, run id) of this registration. A new version is created with its decision in the same
    call (never a version without one); one that an earlier try made (cut short by a kill or a timeout) is
    finished instead, and no other is made."""
    if reg.existing is not None:
        v = str(reg.existing.version)
        log.warning("v%s already registers this evaluation (registration_key %s): finishing it", v, reg.key[:12])
        list_version(reg.client, reg.name, reg.existing)
        return v, reg.existing.run_id
    decided = {**_decision_tags(decision), CHECKS: json.dumps(decision.checks, sort_keys=True)}
    return _log_and_create(cfg, paths, reg, lineage.collect(cfg, paths), decided)


def set_aliases(reg: Registration, version: str, decision: gate.Decision) -> gate.Decision:
    """Step 4: `challenger` on the version; `champion` too when the gate promotes it and the champion it
    judged against still holds the alias. The decision as it stands afterwards, also in the version's tags."""
    client, name = reg.client, reg.name
    client.set_registered_model_alias(name, CHALLENGER, version)  # only ever on a version that carries its decision
    if decision.promote:
        # Under the registry-wide lock (another workspace, or a person, may be moving it too): the
        # gate judged against `champion_before`; if the alias moved meanwhile, that judgement no
        # longer applies.
        with promotion.champion_lock(client, name):
            now = promotion.current_champion(client, name)
            if (str(now.version) if now is not None else None) != reg.champion_before:
                moved = f"champion moved to v{now.version if now else '-'} during registration; evaluate again"
                decision = replace(decision, promote=False, reason=moved)
            else:
                by_gate = {**_decision_tags(decision), "promoted_by": "gate", "promoted_at": promotion.now()}
                promotion.move_champion(client, name, version, reg.champion_before, by_gate)
    if not decision.promote:
        for tag, value in _decision_tags(decision).items():
            client.set_model_version_tag(name, version, tag, value)
    return decision


def report(paths: Paths, reg: Registration, version: str, run_id: str, decision: gate.Decision) -> RegisterResult:
    """Step 5: reports/registry.json, metrics/registry.json and the registration's paragraph of the run's
    description (replacing an earlier registration's)."""
    result = RegisterResult(
        name=reg.name,
        version=version,
        promoted=decision.promote,
        reason=decision.reason,
        run_id=run_id,
        champion_before=reg.champion_before,
        champion=version if decision.promote else reg.champion_before,
        checks=decision.checks,
    )
    _write_reports(paths, result, reg.evaluation, decision.figures)
    note = reg.client.get_run(run_id).data.tags.get(NOTE, "")
    trained = note.split(REGISTRATION_MARK)[0].rstrip()
    described = describe_registration(reg.evaluation, reg.name, version, decision.promote, decision.reason)
    reg.client.set_tag(run_id, NOTE, (((trained + "\n\n") if trained else "") + described)[:8000])  # MLflow's cap
    return result


def _decision_tags(decision: gate.Decision) -> dict[str, str]:
    return {
        "promotion_decision": "promoted" if decision.promote else "kept",
        "promotion_reason": decision.reason[:4000],
    }


def _write_reports(paths: Paths, result: RegisterResult, evaluation: dict[str, Any], figures: dict[str, Any]) -> None:
    """reports/registry.json (the result, the test accuracy, the gate's figures) and metrics/registry.json."""
    accuracy = float(evaluation["policy"]["accuracy"])
    record = {**result.__dict__, "eval_accuracy": accuracy, "figures": figures, "challenger": result.version}
    write_json(paths.registry_report, record)
    decision = "promoted" if result.promoted else "kept"
    write_json(paths.registry_metrics, {"version": result.version, "decision": decision})


REGISTRATION_KEY = "registration_key"
# The gate's checks, rule -> held, in a version's lineage JSON (a tag on versions registered before it).
CHECKS = "promotion_checks"


def recorded(version: Any) -> dict[str, Any]:
    """The version's whole record (the JSON its `lineage` tag names); {} when it has none or it cannot be read."""
    import mlflow

    uri = (version.tags or {}).get("lineage")
    try:
        return mlflow.artifacts.load_dict(uri) if uri else {}
    except (mlflow.exceptions.MlflowException, OSError, ValueError):
        return {}


def _complete(version: Any, champion_now: str | None) -> bool:
    """A registration with nothing left to do: kept (its decision is on it), or promoted and champion."""
    decided = version.tags.get("promotion_decision")
    return decided == "kept" or (decided == "promoted" and champion_now == str(version.version))


def _finished(
    client: Any, paths: Paths, name: str, version: Any, champion_now: str | None, evaluation: dict[str, Any]
) -> RegisterResult:
    """The result of a registration made before, as its tags recorded it; the challenger alias put
    back on it when the cut came before the alias moved (and no later version holds it)."""
    v = str(version.version)
    holder = alias_version(client, name, CHALLENGER)
    if holder is None or int(holder.version) < int(v):
        client.set_registered_model_alias(name, CHALLENGER, v)
    promoted = version.tags.get("promotion_decision") == "promoted"
    checks = json.loads(version.tags.get(CHECKS) or recorded(version).get(CHECKS) or "{}")
    result = RegisterResult(
        name=name, version=v, promoted=promoted, reason=version.tags.get("promotion_reason", ""),
        run_id=version.run_id, champion_before=None if promoted else champion_now, champion=champion_now,
        checks=checks,
    )  # fmt: skip
    log.info("v%s already registers this evaluation (%s): nothing to do", v, version.tags.get("promotion_decision"))
    _write_reports(paths, result, evaluation, {})
    return result


def registration_key(paths: Paths, evaluation: dict[str, Any], train_run: str | None) -> str:
    """What makes two registrations the same: the evaluated adapter, its evaluation, its training run."""
    digest = hashlib.sha256(paths.eval_results.read_bytes())
    digest.update(f"\0{evaluation.get('candidate_sha256')}\0{train_run}".encode())
    return digest.hexdigest()


def find_registration(client: Any, name: str, key: str) -> Any | None:
    """The version of `name` registered with `key` (the oldest, if MLflow's retries made more: the
    others are deleted, so one registration is one version); None when there is none."""
    try:
        found = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get(REGISTRATION_KEY) == key]
    except Exception as exc:  # no such model yet
        if not is_absent(exc):
            raise
        return None
    found.sort(key=lambda v: int(v.version))
    for duplicate in found[1:]:
        log.warning(
            "deleting v%s, a duplicate of v%s (one registration, made twice)", duplicate.version, found[0].version
        )
        client.delete_model_version(name, duplicate.version)
    return found[0] if found else None


def _log_and_create(
    cfg: Config, paths: Paths, reg: Registration, tags: dict[str, str], decision: dict[str, str]
) -> tuple[str, str]:
    """Log the run's reports and the model, then create the version with its decision in the same
    call (never a version without one); (version, run id)."""
    import mlflow

    client, name, key = reg.client, reg.name, reg.key
    run_id = reg.train.get("mlflow_run_id")
    try:
        if run_id:
            client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        run_id = None  # e.g. `dvc repro` in a clone without the training run's store
    # A run of its own (no training run to add to) is named for this command and this project's commit.
    own = {} if run_id else mlflow_source_tags(paths.root, "grpo register")
    # This registration's records on the run, apart from another registration's of the same run.
    records = f"registration-{key[:8]}"
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "grpo-register", tags=own or None) as run:
        if not run_id:
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.model_dump()).items()})
        _log_reports(paths, reg.evaluation, tags, records)
        reference_sha256 = reg.manifest["sha256"]
        reference_version = ensure_reference(client, reference_name(name), paths.reference_dir, reference_sha256)
        reference_uri = f"models:/{reference_name(name)}/{reference_version}"
        model_config = pyfunc_config(cfg, paths, reference_uri, reference_sha256)
        model = logged_policy(client, cfg, paths, run.info, model_config)
        parity_report = _verified(client, model, reg.expected, run.info.run_id)
        record = lineage.present({
            **tags,
            **eval_tags(reg.evaluation),
            **verifier_tags(reg.train, reg.evaluation),
            "task": str((reg.evaluation.get("task") or {}).get("name", cfg.task)),
            "reference_model_uri": reference_uri,
            "export_parity": parity_report.summary() if parity_report else None,
            "logged_model_id": model.model_id,
            **decision,  # decided at creation: a version never exists without its decision
            REGISTRATION_KEY: key,
            "lineage": f"runs:/{run.info.run_id}/{records}/lineage.json",
        })  # fmt: skip
        mlflow.log_dict(record, f"{records}/lineage.json")
    _create_version(client, name, model, run.info.run_id, record)
    # Looked up by its key, which also folds duplicates that MLflow's own HTTP retries may have made.
    found = find_registration(client, name, key)
    if found is None:
        raise RegistryError(f"{name}: the version just created (registration_key {key[:12]}) is not in the registry")
    list_version(client, name, found)
    return str(found.version), run.info.run_id


def _create_version(client: Any, name: str, model: Any, run_id: str, record: dict[str, str]) -> None:
    """Version `model` (a LoggedModel) as `name`, with the record's VERSION_TAGS; a create whose answer was lost is
    looked for before anyone tries again."""
    versions.create_version(
        client,
        name,
        model,
        run_id,
        lineage.version_tags(record),
        description=(
            f"LoRA adapter (peft format) for the base model at {record['reference_model_uri']}, and an MLflow "
            f"pyfunc model: logged model {model.name} ({model.model_id}). Load with mlflow.pyfunc.load_model(uri)"
            ".predict([question]), or with transformers + peft: PeftModel.from_pretrained(AutoModelForCausalLM."
            "from_pretrained(base_dir), adapter_dir). Every test figure and lineage record: the JSON that the "
            "`lineage` tag names."
        ),
        # The create may have reached the server before the answer was lost (a timeout): look before
        # anyone tries again, so that a retry finishes that version instead of making another.
        made=lambda: find_registration(client, name, record[REGISTRATION_KEY]),
    )


def _log_reports(paths: Paths, evaluation: dict[str, Any], tags: dict[str, str], records: str) -> None:
    """Into the active run: the held-out charts and table, the lineage tags, the stages' reports."""
    import mlflow

    mlflow.log_metrics(held_out_metrics(evaluation))
    mlflow.log_table(held_out_table(evaluation), artifact_file=f"{records}/test-figures.json")
    mlflow.set_tags(tags)
    for report in (
        paths.eval_report,
        paths.eval_chart,
        paths.eval_samples,
        paths.validation_report,
        paths.train_plot,
        paths.val_plot,
        paths.train_summary,
        paths.eval_results,
    ):
        if report.exists():
            mlflow.log_artifact(str(report), "reports")


def checkpoint_holding(experiment_id: str, run_id: str, weights_sha256: str | None) -> Any | None:
    """The READY checkpoint model of training run `run_id` whose adapter weights are `weights_sha256` (the
    selected step's, if several), or None."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    if not weights_sha256:
        return None
    found = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND model_type = '{CHECKPOINT_TYPE}'",
        output_format="list",
    )
    found = [m for m in found if m.tags.get(WEIGHTS_SHA256) == weights_sha256 and m.status == LoggedModelStatus.READY]
    found.sort(key=lambda m: (m.tags.get(SELECTED) == "true", int(m.tags.get(STEP, "0"))))
    return found[-1] if found else None


def logged_policy(client: Any, cfg: Config, paths: Paths, run: Any, model_config: dict[str, Any]) -> Any:
    """The LoggedModel the version is made from, its folder a pyfunc model too (see the module docstring).

    A new one stays PENDING until the export check has passed (_verified finalizes it); a checkpoint model
    gets the pyfunc files beside its adapter, unless it was registered before (a version's files never change).
    """
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    weights = paths.policy_dir / ADAPTER_WEIGHTS
    weights_sha256 = file_hash(weights) if weights.exists() else None
    model = checkpoint_holding(run.experiment_id, run.run_id, weights_sha256)
    skip: set[str] = set()
    if model is None:
        note = "models/policy as `grpo register` evaluated it: LoRA adapter (peft format) and MLflow pyfunc model."
        tags = lineage.present({WEIGHTS_SHA256: weights_sha256, NOTE: note})
        model = client.create_logged_model(
            run.experiment_id, name="policy", source_run_id=run.run_id, model_type=POLICY_MODEL_TYPE, tags=tags
        )
    else:
        shipped = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
        if "MLmodel" in shipped and model.tags.get(MLFLOW_MODEL_VERSIONS):
            return model
        # The weights are there, byte for byte; the evaluated tokenizer and config go over the checkpoint's.
        skip = {ADAPTER_WEIGHTS}
    template = prompt_template(cfg, paths)
    with tempfile.TemporaryDirectory(prefix="grpo-register-") as tmp:
        example = example_question(paths, template.instruction or "{question}")
        folder = model_folder(paths.policy_dir, Path(tmp) / "policy", model_config, example)
        name_model(folder, model)
        for item in skip:
            (folder / item).unlink()
        client.log_model_artifacts(model.model_id, str(folder))
    return model


def _verified(client: Any, model: Any, expected: Any, run_id: str) -> parity.ParityReport | None:
    """The export check on `model`'s files; a model made for this registration is finalized by its outcome."""
    from mlflow.entities import LoggedModelStatus

    made = model.status == LoggedModelStatus.PENDING
    try:
        report = verify_export(expected, model.model_id, run_id)
    except RegistryError:
        if made:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    if made:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return report


def _read(path: Path, stage: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{path} does not exist: run `grpo {stage}` first") from None
