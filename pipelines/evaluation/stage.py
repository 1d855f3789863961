"""Stage 4, evaluate: the candidate, the reference and the current champion on the held-out problems.

All three answer the same problems with the same decoding (greedy for pass@1; k samples, same
seed, for pass@k, mean@k and maj@k), judged by the training verifiers. The champion is fetched
from the registry by alias and re-scored here rather than trusted from its old tags, so the
comparisons are paired: a bootstrap interval of each accuracy difference and McNemar's exact test.
The register stage's promotion gate reads the per-problem outcomes this stage writes (reports/).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import Config, ConfigError, EvaluateConfig
from pipelines.evaluation import report
from pipelines.evaluation.agreement import ledger_agreement
from pipelines.evaluation.scoring import answer_problems, summarize
from pipelines.evaluation.stats import paired_comparison
from pipelines.hashing import folder_sha256
from pipelines.io import read_jsonl, write_json, write_jsonl, write_text
from pipelines.paths import Paths
from pipelines.verifiers import catalog
from pipelines.verifiers.task import Task
from pipelines.verifiers.versions import verifier_versions

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    reference: dict[str, float]
    policy: dict[str, float]
    champion: dict[str, float] | None = None
    champion_version: str | None = None
    comparison: dict[str, Any] = field(default_factory=dict)


def compare(outcomes: dict[str, list[dict[str, Any]]], cfg: EvaluateConfig) -> dict[str, Any]:
    """Paired comparisons of the candidate (`policy`) with the reference and, if scored, the champion."""
    policy = outcomes["policy"]
    result: dict[str, Any] = {}
    for other in ("reference", "champion"):
        rows = outcomes.get(other)
        if not rows:
            result[f"policy_vs_{other}"] = None
            continue
        if [o["id"] for o in rows] != [o["id"] for o in policy]:
            raise ValueError(f"{other} and policy were not scored on the same problems in the same order")
        with_k = all("mean_at_k" in o for o in policy + rows)
        result[f"policy_vs_{other}"] = paired_comparison(
            [o["correct"] for o in policy],
            [o["correct"] for o in rows],
            resamples=cfg.bootstrap_samples,
            confidence=cfg.confidence,
            seed=cfg.seed,
            candidate_mean_at_k=[o["mean_at_k"] for o in policy] if with_k else None,
            other_mean_at_k=[o["mean_at_k"] for o in rows] if with_k else None,
        )
    return result


def headline(evaluation: dict[str, Any]) -> dict[str, float]:
    """The candidate's figures people compare across runs: strict and lenient accuracy, pass@k, format rate, and
    the accuracy gain over the reference (metrics/eval.json; the rest is in reports/eval.json).

    >>> headline({"policy": {"accuracy": 0.5, "lenient_accuracy": 0.6, "pass_at_k": 0.7, "format_rate": 0.9,
    ...           "mean_length": 40.0}, "gain": 0.1})
    {'accuracy': 0.5, 'lenient_accuracy': 0.6, 'pass_at_k': 0.7, 'format_rate': 0.9, 'gain': 0.1}
    """
    policy = evaluation["policy"]
    figures = {"accuracy": policy["accuracy"], "lenient_accuracy": policy.get("lenient_accuracy")}
    figures.update({key: policy.get(key) for key in ("pass_at_k", "format_rate")})
    figures["gain"] = evaluation.get("gain")
    return {key: value for key, value in figures.items() if value is not None}


def write_outputs(
    paths: Paths,
    cfg: EvaluateConfig,
    outcomes: dict[str, list[dict[str, Any]]],
    *,
    champion_version: str | None,
    champion_own_base: bool = False,
    candidate_sha256: str,
    reference_sha256: str,
    task: Task | None = None,
    agreement: dict[str, Any] | None = None,
) -> EvalResult:
    """reports/eval.json (the whole evaluation, which the gate reads), metrics/eval.json (the candidate's headline
    figures, for `dvc metrics show`), reports/eval-samples.jsonl, reports/eval.md and its chart, from per-problem
    outcomes."""
    if task is None:
        from pipelines.verifiers.math_task import TASK as task
    summaries = {label: summarize(rows) for label, rows in outcomes.items() if rows}
    comparison = compare(outcomes, cfg)
    evaluation = {
        "reference": summaries["reference"],
        "policy": summaries["policy"],
        "champion": summaries.get("champion"),
        "champion_version": champion_version,
        "champion_own_base": champion_own_base,
        "gain": summaries["policy"]["accuracy"] - summaries["reference"]["accuracy"],
        "comparison": comparison,
        "settings": cfg.model_dump(),
        "candidate_sha256": candidate_sha256,
        "reference_sha256": reference_sha256,
        "task": {"name": task.name, "description": task.description, "lenient": task.lenient_name},
        "verifiers": verifier_versions(
            task, ["judge"]
        ),  # the code that judged every model here (verifiers/versions.py)
        "agreement": agreement,  # the judge vs training's correctness reward on the ledger (agreement.py)
    }
    samples = [row for label in ("reference", "champion", "policy") for row in outcomes.get(label) or []]
    write_jsonl(paths.eval_samples, samples)
    write_json(paths.eval_results, evaluation)
    write_json(paths.eval_metrics, headline(evaluation))
    png = report.chart(evaluation, paths.eval_chart)
    write_text(paths.eval_report, report.markdown(evaluation, cfg, png.name))
    return EvalResult(
        reference=summaries["reference"],
        policy=summaries["policy"],
        champion=summaries.get("champion"),
        champion_version=champion_version,
        comparison=comparison,
    )


class NonFiniteWeights(ConfigError):
    """A policy whose saved weights hold NaN or inf: nothing to evaluate."""


def check_finite_weights(folder: Path) -> None:
    """Refuse a policy folder whose safetensors hold NaN or inf (training diverged)."""
    import torch
    from safetensors.torch import load_file

    for file in sorted(folder.glob("*.safetensors")):
        bad = [name for name, t in load_file(str(file)).items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteWeights(
                f"{file} holds NaN or inf in {len(bad)} tensor(s) ({bad[0]}, ...): training diverged, there is "
                "nothing to evaluate. Train again (lower train.learning_rate, raise train.temperature)"
            )


def _decoder(model: Any, bf16: bool) -> Any:
    """A plain copy for decoding: adapter merged, bf16 weights when asked (generation/sampling_copy.py
    says why it is faster). Every model is scored the same way."""
    import torch

    from pipelines.generation.sampling_copy import SamplingCopy

    return SamplingCopy(model, torch.bfloat16 if bf16 else torch.float32).model


def run(cfg: Config, paths: Paths) -> EvalResult:
    from pipelines.env import set_threads
    from pipelines.evaluation import champion as registry_champion
    from pipelines.snapshot.manifest import verify

    e = cfg.evaluate
    set_threads(cfg.runtime.num_threads)
    manifest = verify(paths.reference_dir)
    check_finite_weights(paths.policy_dir)
    rows = read_jsonl(paths.eval_split)
    task = catalog.load(cfg.task, paths.root)
    if e.champion:
        from pipelines.mlflow_store import check_reachable

        check_reachable(paths.root)  # a server that is down fails the stage in seconds, before any scoring
    with tempfile.TemporaryDirectory(prefix="grpo-champion-") as tmp:
        # Fetched first: a registry that cannot be reached fails the stage before any scoring.
        champion = (
            registry_champion.fetch(cfg.registry.model_name, paths.root, manifest["sha256"], Path(tmp))
            if e.champion
            else None
        )
        if cfg.runtime.rollout_backend == "vllm":
            outcomes = _score_on_vllm(cfg, paths, rows, champion, task)
        else:
            outcomes = _score_locally(cfg, paths, rows, champion, task)
    agreement = ledger_agreement(paths.root, paths.train_split, task, timeout=e.judge_timeout)
    if agreement and agreement.get("disagreements"):
        log.warning(
            "the %s task's judge and its training reward %r disagree on %d of %d completions of training step %d: "
            "training rewarded what evaluation does not count (reports/eval.md)",
            task.name, agreement["reward"], agreement["disagreements"], agreement["checked"], agreement["step"],
        )  # fmt: skip
    return write_outputs(
        paths,
        e,
        outcomes,
        champion_version=champion.version if champion else None,
        champion_own_base=bool(champion and champion.base_dir),
        candidate_sha256=folder_sha256(paths.policy_dir),
        reference_sha256=manifest["sha256"],
        task=task,
        agreement=agreement,
    )


def _score_locally(
    cfg: Config, paths: Paths, rows: list[dict[str, Any]], champion: Any, task: Task
) -> dict[str, list[dict[str, Any]]]:
    """Reference, policy and champion, each on a decoding copy in this process."""
    from peft import PeftModel

    from pipelines.device import resolve
    from pipelines.snapshot.loading import load_reference

    e = cfg.evaluate
    backend = cfg.runtime.rollout_backend
    device = resolve(cfg.runtime.device)
    decode = e.model_copy(update={"bf16": False})  # the decoding copies below already hold bf16 weights
    outcomes: dict[str, list[dict[str, Any]]] = {}
    base, tokenizer = load_reference(paths.reference_dir, cfg.snapshot.trust_remote_code, device)
    outcomes["reference"] = answer_problems(_decoder(base, e.bf16), tokenizer, rows, decode, "reference", backend, task)
    policy = PeftModel.from_pretrained(base, paths.policy_dir).eval()  # wraps `base` in place
    outcomes["policy"] = answer_problems(_decoder(policy, e.bf16), tokenizer, rows, decode, "policy", backend, task)
    del policy, base
    if champion is not None:
        champ_base, champ_tokenizer = load_reference(
            champion.base_dir or paths.reference_dir, cfg.snapshot.trust_remote_code, device
        )
        champ = PeftModel.from_pretrained(champ_base, champion.adapter_dir).eval()
        scored = answer_problems(_decoder(champ, e.bf16), champ_tokenizer, rows, decode, "champion", backend, task)
        outcomes["champion"] = [dict(o, version=champion.version) for o in scored]
    return outcomes


def _score_on_vllm(
    cfg: Config, paths: Paths, rows: list[dict[str, Any]], champion: Any, task: Task
) -> dict[str, list[dict[str, Any]]]:
    """Reference, policy and champion on one vLLM server: the base model and two adapters on it."""
    import json
    import uuid

    from transformers import AutoTokenizer

    from pipelines.config import ConfigError
    from pipelines.generation.vllm_backend import RemoteModel
    from pipelines.generation.vllm_server import vllm_session

    if champion is not None and champion.base_dir is not None:
        raise ConfigError(
            f"champion v{champion.version} was trained on another base model than this reference, and the vLLM "
            "server serves this reference only: score it with runtime.rollout_backend=lean, or set "
            "evaluate.champion=false"
        )
    tokenizer = AutoTokenizer.from_pretrained(paths.reference_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapters = {"policy": paths.policy_dir, **({"champion": champion.adapter_dir} if champion else {})}
    rank = max(int(json.loads((d / "adapter_config.json").read_text())["r"]) for d in adapters.values())
    session = vllm_session(
        cfg.runtime.vllm, paths.root, paths.reference_dir, rank, cfg.evaluate.seed, bf16=cfg.evaluate.bf16
    )
    with session as (client, base):
        models = {"reference": RemoteModel(client, base)}
        run = uuid.uuid4().hex[:8]
        for label, folder in adapters.items():
            name = f"eval-{label}-{run}"
            client.load_adapter(name, str(Path(folder).resolve()))
            models[label] = RemoteModel(client, name)
        try:
            outcomes = {
                label: answer_problems(model, tokenizer, rows, cfg.evaluate, label, "vllm", task)
                for label, model in models.items()
            }
        finally:
            for label, model in models.items():
                if label != "reference":
                    client.unload_adapter(model.name)
    if champion is not None:
        outcomes["champion"] = [dict(o, version=champion.version) for o in outcomes["champion"]]
    return outcomes
