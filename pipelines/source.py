"""Which code ran: the git commit and branch, whether the code differs from it, and MLflow's source tags.

"Dirty" is about the code and its configuration, not about what the pipeline itself writes: every
run rewrites params.yaml (`grpo run -S`, presets), dvc.lock and the stages' outputs, and DVC writes
.gitignore files and *.dvc pointers beside what it tracks. Those are left out of the check, so that
a demo run from a clean checkout registers `git_dirty: false`; data and params have their own tags
(dataset digest, DVC hashes, params hash).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

# What the pipeline and DVC write besides the outputs dvc.yaml declares: params (presets, -S), the lock,
# the pipeline's own state (.grpo/), `grpo run`'s results (reports/run.json), `dvc plots show`'s pages.
# mlflow.db's journal files: SQLite leaves one behind when a writer is killed.
OWN_FILES = (
    "params.yaml", "dvc.lock", ".grpo", "reports/run.json", "dvc_plots",
    "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm",
)  # fmt: skip
OWN_PATTERNS = ("**/*.dvc", "**/.gitignore")
DIRTY_MEANS = (
    "uncommitted changes (tracked or new files) other than params.yaml, dvc.lock, the stage outputs dvc.yaml "
    "declares, .grpo/, reports/run.json, dvc_plots/, *.dvc pointers and .gitignore files, which the pipeline and DVC "
    "write themselves"
)
# How many of the changed files a tag names.
MAX_LISTED = 10


def _git(root: Path, *args: str) -> str | None:
    """git's output (not stripped: status lines start with a space), or None when git fails or is missing."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def declared_outputs(root: Path) -> list[str]:
    """Every out, metric and plot path of every stage in dvc.yaml (empty when it cannot be read)."""
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return []
    found: list[str] = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                found.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return found


def changed_files(root: Path) -> list[str] | None:
    """Files under `root` that differ from the commit, the pipeline's own outputs left out; None without git."""
    excluded = [*OWN_FILES, *declared_outputs(root)]
    pathspec = [".", *(f":(exclude){p}" for p in excluded), *(f":(exclude,glob){p}" for p in OWN_PATTERNS)]
    # -uall: new files one by one, so that an excluded file in a new folder does not show as the folder.
    status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *pathspec)
    if status is None:
        return None
    return [line[3:] for line in status.splitlines() if line.strip()]


def git_state(root: Path) -> dict[str, str]:
    """git_commit, git_dirty ("true", "false" or "unknown"), what dirty means, and the changed files."""
    commit = (_git(root, "rev-parse", "HEAD") or "").strip() or "unknown"
    changed = changed_files(root) if commit != "unknown" else None
    state = {
        "git_commit": commit,
        "git_dirty": "unknown" if changed is None else str(bool(changed)).lower(),
        "git_dirty_means": DIRTY_MEANS,
    }
    if changed:
        more = len(changed) - MAX_LISTED
        state["git_dirty_files"] = ", ".join(changed[:MAX_LISTED]) + (f" and {more} more" if more > 0 else "")
    return state


def mlflow_source_tags(root: Path, command: str) -> dict[str, Any]:
    """The source tags MLflow's UI shows for a run: what ran (`grpo train`), locally, at which commit.

    MLflow fills them from sys.argv[0], which is the `grpo` script in the virtual environment (outside
    the project's git tree, so no commit) or a Prefect worker's entry point: these name the project's.
    """
    tags: dict[str, Any] = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL"}
    commit = (_git(root, "rev-parse", "HEAD") or "").strip()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        branch = (_git(root, "rev-parse", "--abbrev-ref", "HEAD") or "").strip()
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
    return tags
