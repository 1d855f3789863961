"""What a run says: the end of `grpo run` (table, then decision, then what to commit), the stages'
one-line summaries on the console, the artifacts (MLflow links, the flow's summary, rounded figures,
a description each), and no progress bar in a log."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from flows import run_report
from pipelines.env import console_logging
from pipelines.stages import summary
from tests.conftest import REPO, make_project

EVAL_MD = """# Evaluation on the held-out split

64 problems; every model answers the same problems with the same decoding: greedy for pass@1,
k=4 samples.

| metric | reference | champion | candidate |
|---|---:|---:|---:|
| accuracy (greedy pass@1, the task's strict verdict) | 0.312 | – | 0.469 |
| format rate (greedy) | 0.500 | – | 0.984 |

## Paired comparison on the same problems
"""


def test_run_summary_ends_with_the_table_and_the_decision(tmp_path):
    root = tmp_path
    (root / "reports").mkdir()
    (root / "reports" / "eval.md").write_text(EVAL_MD)
    results = {
        "validate": {"reused": True},
        "register": {"name": "grpo-policy", "version": "3", "promoted": True, "champion_before": "2", "reason": "gain"},
    }
    saved = run_report.write(root, results)
    assert json.loads(saved.read_text()) == results and saved == root / "reports" / "run.json"

    lines = run_report.summary(root, results, saved).splitlines()
    assert lines[0] == "Every stage's result: reports/run.json (reused from dvc.lock: validate)"
    assert lines[2] == "Evaluation on the held-out split, 64 problems (reports/eval.md):"
    assert lines[3:7] == EVAL_MD.splitlines()[5:9]
    assert lines[-1] == "Registry: grpo-policy v3 promoted to champion (champion before: v2). Reason: gain"


def test_a_reused_registration_is_read_from_the_stages_file(tmp_path):
    (tmp_path / "metrics").mkdir()
    kept = {"name": "m", "version": "1", "promoted": False, "champion": None, "reason": "no gain"}
    (tmp_path / "metrics" / "registry.json").write_text(json.dumps(kept))
    line = run_report.decision(tmp_path, {"reused": True})
    assert line == (
        "Registry: m v1 kept as challenger (no champion yet) (reused: dvc.lock says nothing changed since). "
        "Reason: no gain"
    )


def test_stage_summaries_say_what_each_stage_did():
    evaluation = {
        "reference": {"accuracy": 0.25},
        "policy": {"accuracy": 0.5, "problems": 8.0},
        "champion": {"accuracy": 0.375},
        "champion_version": "2",
        "comparison": {
            "policy_vs_reference": {"diff": 0.25, "ci_low": 0.0, "ci_high": 0.5},
            "policy_vs_champion": {"diff": 0.125, "ci_low": -0.125, "ci_high": 0.375},
        },
    }
    assert summary("evaluate", evaluation) == (
        "accuracy on 8 held-out problems: reference 0.250, champion v2 0.375, candidate 0.500; gain vs reference "
        "+0.250 [+0.000, +0.500], vs champion +0.125 [-0.125, +0.375] (reports/eval.md)"
    )
    validated = {"source": "data/raw/x.jsonl", "train_rows": 90, "val_rows": 5, "eval_rows": 10, "digest": "ab" * 32}
    assert summary("validate", validated) == (
        "data/raw/x.jsonl: train 90, val 5, eval 10 rows, 0 rejected; digest abababababab"
    )


def test_console_logging_writes_the_domain_lines_to_stderr(capsys):
    logger = logging.getLogger("pipelines")
    before = (logger.handlers[:], logger.level, logger.propagate)
    try:
        console_logging()
        console_logging()  # once only, however often it is called
        logging.getLogger("pipelines.grpo.trainer").info("step 1/2: reward 0.5")
        logging.getLogger("pipelines.grpo.trainer").debug("not shown")
    finally:
        logger.handlers[:], logger.propagate = before[0], before[2]
        logger.setLevel(before[1])
    err = capsys.readouterr().err
    assert err.count("step 1/2: reward 0.5") == 1 and "| INFO    | pipelines.grpo.trainer - step 1/2" in err
    assert "not shown" not in err


def test_the_mlflow_links_follow_the_ui_address(tmp_path, monkeypatch):
    import mlflow

    from tasks.mlflow_links import run_link, version_link

    root = make_project(tmp_path / "project")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        # Its own experiment: another test in this process may have left one active by id.
        experiment_id = mlflow.create_experiment("link", artifact_location=(root / "mlartifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment_id) as run:
            run_id, experiment = run.info.run_id, run.info.experiment_id
    finally:
        mlflow.set_tracking_uri(None)
    page = f"#/experiments/{experiment}/runs/{run_id}"
    monkeypatch.delenv("MLFLOW_UI_URL", raising=False)
    assert run_link(root, run_id).startswith(f"[{run_id}](http://127.0.0.1:5000/{page}) (after `mlflow ui")
    assert run_link(root, "no-such-run") == "`no-such-run`"
    monkeypatch.setenv("MLFLOW_UI_URL", "https://mlflow.example.org/team/")
    assert run_link(root, run_id) == f"[{run_id}](https://mlflow.example.org/team/{page})"
    assert version_link(root, "grpo policy", "3") == (
        "[grpo policy v3](https://mlflow.example.org/team/#/models/grpo%20policy/versions/3)"
    )


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


def test_the_flow_summary_has_the_figures_rounded_the_decision_and_the_links(tmp_path, monkeypatch):
    from tasks import summary

    monkeypatch.setenv("MLFLOW_UI_URL", "http://ui.example")
    monkeypatch.setattr(summary, "run_link", lambda root, run_id: f"<run {run_id}>")  # no tracking store here
    _write(tmp_path / "metrics" / "train.json", {"reward": 0.3939393939393939, "steps": 30, "kl": 0.0000123})
    _write(tmp_path / "metrics" / "eval.json", {"accuracy": 0.46875, "gain": 0.15625})
    _write(tmp_path / "reports" / "eval.json", {"reference": {"accuracy": 0.3125}, "champion": None})
    registered = {"name": "m", "version": "3", "promoted": False, "champion": "2", "reason": "no gain", "run_id": "r1"}
    _write(tmp_path / "reports" / "registry.json", registered)
    text = summary.markdown(tmp_path, {"validate": {"reused": True}, "register": {"reused": True}})
    assert "| final reward | 0.394 |" in text and "| training steps | 30 |" in text
    assert "| final KL | 1.23e-05 |" in text
    assert "| held-out accuracy (candidate) | 0.469 |" in text and "| held-out accuracy (reference) | 0.312 |" in text
    assert "champion before" not in text  # no champion was evaluated
    assert "**Decision:** m v3 kept as challenger (champion stays v2)" in text
    assert "- MLflow run: <run r1>" in text  # the registered version's run
    assert "- Registered version: [m v3](http://ui.example/#/models/m/versions/3)" in text
    assert "- Stages: validate reused, register reused" in text


def test_every_artifact_has_a_description_and_figures_are_rounded():
    from tasks.stages import _rounded_cell, rounded

    calls = []
    for path in [*(REPO / "flows").glob("*.py"), *(REPO / "tasks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "").startswith("create_"):
                calls.append((path.name, node.lineno, {k.arg for k in node.keywords}))
    assert len(calls) >= 8
    assert [(name, line) for name, line, keywords in calls if not {"key", "description"} <= keywords] == []
    assert (rounded(0.3939393939393939), rounded(7), rounded(None), rounded(-0.0004)) == ("0.394", "7", "–", "-0.0004")
    assert [_rounded_cell(c) for c in ("12", "0.123456", "", "nan")] == ["12", "0.123", "", "nan"]


def test_the_end_of_a_run_says_what_to_commit(tmp_path):
    root = make_project(tmp_path / "project", dvc=True)
    assert run_report.commit_hint(root) is None  # nothing written yet
    _write(root / "dvc.lock", "schema: '2.0'\n")
    _write(root / "metrics" / "eval.json", {"accuracy": 0.5})
    _write(root / "reports" / "eval.md", "# Evaluation\n")
    _write(root / "reports" / "run.json", {})  # git-ignored: not to commit
    _write(root / "reports" / ".gitignore", "/gx\n")  # `git add reports` takes it
    _write(root / "models" / ".gitignore", "/reference\n")  # DVC's, for an out of its own
    _write(root / "reports" / "registry.json", {"name": "m", "version": "4", "promoted": True, "reason": "gain"})
    hint = run_report.commit_hint(root)
    assert hint.endswith(
        'git add dvc.lock metrics reports models/.gitignore && git commit -m "grpo run: m v4 champion"'
    )
    assert "(dvc.lock, metrics/, reports/, models/.gitignore)" in hint
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "run"], cwd=root, check=True)
    assert run_report.commit_hint(root) is None
    assert run_report.commit_hint(tmp_path) is None  # not a git work tree


def test_no_progress_bar_in_a_log(tmp_path):
    """transformers' GGUF conversion draws a bare tqdm bar: in a log (stderr not a terminal) it is off."""
    bar = (
        "from pipelines.env import quiet_progress_bars; quiet_progress_bars()\n"
        "from tqdm.auto import tqdm\n"
        "for _ in tqdm(range(50), desc='Converting and de-quantizing GGUF tensors...'): pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    done = subprocess.run([sys.executable, "-c", bar], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert done.stderr == ""
    loud = subprocess.run([sys.executable, "-c", bar.split("\n", 1)[1]], cwd=REPO, env=env, capture_output=True)
    assert b"GGUF tensors" in loud.stderr  # without it, the bar
