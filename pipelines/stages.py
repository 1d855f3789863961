"""The five stages by name: what both drivers (`dvc repro` and the Prefect flow) call."""

from __future__ import annotations

import importlib
import logging
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from pipelines import diskspace
from pipelines.config import Config
from pipelines.paths import Paths


@dataclass(frozen=True)
class Stage:
    """One stage: its name (the CLI's subcommand, dvc.yaml's stage, the Prefect task), what it does (the
    CLI's help), the module whose `run` it calls, and the config section `run` takes (None: all of it)."""

    name: str
    does: str
    module: str
    section: str | None = None


# The stages in lifecycle order: the one table the CLI, the Prefect flow and dvc.yaml's test read.
TABLE = (
    Stage("validate", "check the dataset with the Great Expectations suite and write the train/eval splits",
          "pipelines.data.validate"),
    Stage("snapshot", "pin the reference model (safetensors + sha256 manifest) in models/reference",
          "pipelines.snapshot.stage", "snapshot"),
    Stage("train", "GRPO-train a LoRA adapter on the reference; writes models/policy", "pipelines.grpo.trainer"),
    Stage("evaluate", "score reference and policy on the held-out split; writes metrics/eval.json",
          "pipelines.evaluation.stage"),
    Stage("register", "log to MLflow, register the policy, move challenger/champion aliases",
          "pipelines.registry.stage"),
)  # fmt: skip
STAGES = tuple(stage.name for stage in TABLE)

log = logging.getLogger(__name__)


def stage(name: str) -> Stage:
    for entry in TABLE:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")


def run_stage(name: str, cfg: Config, paths: Paths) -> dict[str, Any]:
    """Run one stage and return its result as a plain dict. Heavy imports happen here, not at import."""
    from pipelines.env import prepare_process

    prepare_process()  # a Prefect worker imports the flow, not `grpo`: its stages get the same environment
    entry = stage(name)
    module = importlib.import_module(entry.module)  # a stage's heavy imports only when it runs
    diskspace.check(name, cfg, paths)  # before any work: a stage out of space halfway wastes it
    result = module.run(getattr(cfg, entry.section) if entry.section else cfg, paths)
    done = asdict(result) if is_dataclass(result) else dict(result)
    try:
        line = summary(name, done)
    except (KeyError, TypeError, ValueError):  # a result shaped otherwise must not fail the stage it reports
        line = "done"
    log.info("%s: %s", name, line)
    return done


def summary(name: str, result: dict[str, Any]) -> str:
    """One line that says what a stage did, from its result (for the console and the Prefect run's logs).

    >>> summary("register", {"name": "m", "version": "3", "promoted": False, "champion": "2", "reason": "no gain"})
    'm v3 kept as challenger (champion stays v2): no gain'
    """
    r = result
    if name == "validate":
        return (
            f"{r['source']}: train {r['train_rows']}, val {r.get('val_rows', 0)}, eval {r['eval_rows']} rows, "
            f"{r.get('rejected_rows', 0)} rejected; digest {str(r['digest'])[:12]}"
        )
    if name == "snapshot":
        return f"reference {r['source']} pinned: {r['parameters']:,} parameters, sha256 {str(r['sha256'])[:12]}"
    if name == "train":
        resumed = f" (resumed from step {r['resumed_from']})" if r.get("resumed_from") else ""
        return f"{r['steps']} steps{resumed}, final reward {r['final_reward']:.3f}; MLflow run {r['run_id']}"
    if name == "evaluate":
        return _evaluation_line(r)
    if name == "register":
        if r["promoted"]:
            before = f"v{r['champion_before']}" if r.get("champion_before") else "none"
            return f"{r['name']} v{r['version']} promoted to champion (was {before}): {r['reason']}"
        champion = f"champion stays v{r['champion']}" if r.get("champion") else "no champion"
        return f"{r['name']} v{r['version']} kept as challenger ({champion}): {r['reason']}"
    return str(r)


def _evaluation_line(r: dict[str, Any]) -> str:
    """Accuracy of each model on the held-out problems and the candidate's paired gains."""
    problems = int(r["policy"].get("problems", 0))
    scores = [f"reference {r['reference']['accuracy']:.3f}"]
    if r.get("champion"):
        scores.append(f"champion v{r.get('champion_version')} {r['champion']['accuracy']:.3f}")
    scores.append(f"candidate {r['policy']['accuracy']:.3f}")
    gains = []
    for other in ("reference", "champion"):
        comp = (r.get("comparison") or {}).get(f"policy_vs_{other}")
        if comp:
            gains.append(f"vs {other} {comp['diff']:+.3f} [{comp['ci_low']:+.3f}, {comp['ci_high']:+.3f}]")
    gain_text = f"; gain {', '.join(gains)}" if gains else ""
    return f"accuracy on {problems} held-out problems: {', '.join(scores)}{gain_text} (reports/eval.md)"
