"""What `grpo run` leaves and says: every stage's result in reports/run.json, on the console the
evaluation table (as in reports/eval.md) and the registry's decision, and on stderr what to commit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.io import write_text
from tasks.summary import decision, last_registration

RUN_JSON = Path("reports") / "run.json"


def write(root: Path, results: dict[str, Any]) -> Path:
    """reports/run.json, atomically: the stages' results in pipeline order (what `--json` prints)."""
    path = root / RUN_JSON
    write_text(path, to_json(results) + "\n")
    return path


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, default=str)


def eval_table(report: Path) -> list[str]:
    """The model table of reports/eval.md, its title line first; empty when there is no report.

    >>> import tempfile
    >>> md = Path(tempfile.mkdtemp()) / "eval.md"
    >>> _ = md.write_text("# Evaluation\\n\\n8 problems.\\n\\n| metric | reference |\\n|---|---:|\\n| accuracy | 0.1 |\\n\\n## x\\n")
    >>> eval_table(md)
    ['Evaluation on the held-out split, 8 problems (reports/eval.md):', '| metric | reference |', '|---|---:|', '| accuracy | 0.1 |']
    """  # noqa: E501
    if not report.exists():
        return []
    lines = report.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| metric |")), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    problems = next((line.split(";")[0].split()[0] for line in lines if line.split(" ", 1)[0].isdigit()), None)
    title = "Evaluation on the held-out split" + (f", {problems} problems" if problems else "")
    return [f"{title} (reports/eval.md):", *lines[start:end]]


def summary(root: Path, results: dict[str, Any], saved: Path) -> str:
    """The end of `grpo run`'s output: where the full results are, the table, the decision last."""
    reused = [name for name, r in results.items() if isinstance(r, dict) and r.get("reused")]
    lines = [f"Every stage's result: {saved.relative_to(root) if saved.is_relative_to(root) else saved}"]
    if reused:
        lines[0] += f" (reused from dvc.lock: {', '.join(reused)})"
    table = eval_table(root / "reports" / "eval.md")
    if table:
        lines += ["", *table]
    lines += ["", decision(root, results.get("register"))]
    return "\n".join(lines)


# What a run writes that git keeps: dvc.lock pins each stage's outputs (DVC keeps their bytes), params.yaml
# the values they ran with, and metrics/, plots/ and reports/ the small files DVC leaves to git, which
# `dvc metrics diff` and `dvc plots diff` compare with the last commit; DVC adds outs to .gitignore files.
TO_COMMIT = ("dvc.lock", "params.yaml", "metrics", "plots", "reports", ":(glob)**/.gitignore")


def commit_hint(root: Path) -> str | None:
    """The lines that end `grpo run`: which of its files git sees as new or changed, and the command that
    commits them; None when there are none or `root` is not in a git work tree."""
    import subprocess

    from pipelines.kept_params import preset_label

    try:  # paths relative to `root`, also when the project is a folder inside a larger repository
        listed = subprocess.run(
            ["git", "ls-files", "--others", "--modified", "--deleted", "--exclude-standard", "--", *TO_COMMIT],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    changed = {p if p.endswith(".gitignore") else p.split("/")[0] for p in listed.stdout.splitlines() if p}
    changed -= {p for p in changed if p.split("/")[0] in changed and p.split("/")[0] != p}  # added with its folder
    if preset_label(root / "params.yaml") is not None:
        changed.discard("params.yaml")  # a preset's values: `grpo params restore` first (the note above says so)
    if not changed:
        return None
    order = [name for name in TO_COMMIT[:-1] if name in changed] + sorted(p for p in changed if p not in TO_COMMIT)
    shown = ", ".join(name + ("/" if (root / name).is_dir() else "") for name in order)
    message, registered = "grpo run", last_registration(root)
    if registered:
        role = "champion" if registered.get("promoted") else "challenger"
        message += f": {registered.get('name', 'model')} v{registered['version']} {role}"
    return (
        f"To keep this run, commit what it wrote ({shown}); `dvc metrics diff` and `dvc plots diff` compare with "
        f"the last commit:\n  git add {' '.join(order)} && git commit -m {json.dumps(message)}"
    )
