"""The pipeline flow's own artifact, `grpo-summary`: what the run ended with, on one page of the UI.

The headline figures (the `dvc metrics` files), the registry's decision, and links to the MLflow run
and the registered version; read from the files the stages left, so a reused stage shows its last result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact

from pipelines.paths import Paths
from tasks.mlflow_links import run_link, version_link
from tasks.stages import rounded

KEY = "grpo-summary"

# (file, key, label) of each headline figure, in the table's order: training's, then the held-out split's.
FIGURES = (
    ("train", "steps", "training steps"),
    ("train", "selected_step", "selected step"),
    ("train", "reward", "final reward"),
    ("train", "kl", "final KL"),
    ("train", "val_accuracy", "validation accuracy (selected step)"),
    ("eval", "accuracy", "held-out accuracy (candidate)"),
    ("reference", "accuracy", "held-out accuracy (reference)"),
    ("champion", "accuracy", "held-out accuracy (champion before)"),
    ("eval", "gain", "gain over the reference"),
    ("eval", "lenient_accuracy", "lenient accuracy"),
    ("eval", "pass_at_k", "pass@k"),
    ("eval", "format_rate", "format rate"),
)


def publish(root: Path, results: dict[str, Any]) -> str:
    """The `grpo-summary` markdown artifact of this flow run; returns its text."""
    text = markdown(root, results)
    create_markdown_artifact(
        text, key=KEY, description="the run at a glance: headline figures, the registry's decision, MLflow links"
    )
    return text


def markdown(root: Path, results: dict[str, Any]) -> str:
    """The summary page: figures table, decision, links, and which stages ran or were reused."""
    paths = Paths(root)
    sources = {"train": _read(paths.train_metrics), "eval": _read(paths.eval_metrics)}
    evaluation = _read(paths.eval_results)
    sources["reference"] = evaluation.get("reference") or {}
    sources["champion"] = evaluation.get("champion") or {}
    rows = "".join(
        f"| {label} | {rounded(sources[where][key])} |\n"
        for where, key, label in FIGURES
        if sources[where].get(key) is not None
    )
    lines = ["## GRPO pipeline run", ""]
    lines.append(f"| figure | value |\n|---|---:|\n{rows.rstrip()}" if rows else "No stage wrote its metrics.")
    lines += ["", "**Decision:** " + decision(root, results.get("register")).removeprefix("Registry: "), ""]
    registered = _read(paths.registry_report)
    run_id = registered.get("run_id") or _read(paths.train_summary).get("mlflow_run_id")
    if run_id:
        lines.append(f"- MLflow run: {run_link(root, run_id)}")
    if registered.get("version"):
        lines.append(f"- Registered version: {version_link(root, registered['name'], str(registered['version']))}")
    ran = ", ".join(f"{name} {'reused' if r == {'reused': True} else 'ran'}" for name, r in results.items())
    lines += [f"- Stages: {ran}" if ran else "- Stages: none", ""]
    return "\n".join(lines)


def _read(path: Path) -> dict[str, Any]:
    """A stage's JSON file; empty when the stage never wrote it (a first run that failed, a reused stage's
    file cleaned away)."""
    if not path.exists():
        return {}
    found = json.loads(path.read_text(encoding="utf-8"))
    return found if isinstance(found, dict) else {}


def decision(root: Path, register: dict[str, Any] | None) -> str:
    """The registry's decision in one line: version, champion or challenger, and why."""
    r = register if register and "version" in register else last_registration(root)
    if not r:
        return "Registry: nothing registered (no metrics/registry.json)"
    again = " (reused: dvc.lock says nothing changed since)" if register and register.get("reused") else ""
    name, version = r.get("name", "model"), r["version"]
    if r.get("promoted"):
        before = f"v{r['champion_before']}" if r.get("champion_before") else "none"
        what = f"promoted to champion (champion before: {before})"
    else:
        champion = f"champion stays v{r['champion']}" if r.get("champion") else "no champion yet"
        what = f"kept as challenger ({champion})"
    return f"Registry: {name} v{version} {what}{again}. Reason: {r.get('reason', '?')}"


def last_registration(root: Path) -> dict[str, Any] | None:
    """The registration as the register stage wrote it (the full report, else the metrics file)."""
    for path in (root / "reports" / "registry.json", root / "metrics" / "registry.json"):
        if path.exists():
            found = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(found, dict) and "version" in found and "reason" in found:
                return found
    return None
