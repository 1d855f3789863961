"""The five stages by name: what both drivers (`dvc repro` and the Prefect flow) call."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from typing import Any

from pipelines import diskspace
from pipelines.config import Config
from pipelines.paths import Paths

STAGES = ("validate", "snapshot", "train", "evaluate", "register")

log = logging.getLogger(__name__)


def run_stage(name: str, cfg: Config, paths: Paths) -> dict[str, Any]:
    """Run one stage and return its result as a plain dict. Heavy imports happen here, not at import."""
    from pipelines.env import prepare_process

    prepare_process()  # a Prefect worker imports the flow, not `grpo`: its stages get the same environment
    runner: Callable[[], Any]
    if name == "validate":
        from pipelines.data import validate

        runner = lambda: validate.run(cfg, paths)  # noqa: E731
    elif name == "snapshot":
        from pipelines.snapshot import stage as snapshot

        runner = lambda: snapshot.run(cfg.snapshot, paths)  # noqa: E731
    elif name == "train":
        from pipelines.grpo import trainer

        runner = lambda: trainer.run(cfg, paths)  # noqa: E731
    elif name == "evaluate":
        from pipelines.evaluation import stage as evaluate

        runner = lambda: evaluate.run(cfg, paths)  # noqa: E731
    elif name == "register":
        from pipelines.registry import stage as registry

        runner = lambda: registry.run(cfg, paths)  # noqa: E731
    else:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    diskspace.check(name, cfg, paths)  # before any work: a stage out of space halfway wastes it
    result = runner()
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
