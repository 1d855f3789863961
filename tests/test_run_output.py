"""What a run says: the end of `grpo run` (table, then decision), the stages' one-line summaries on
the console, and the MLflow link of the training artifact."""

from __future__ import annotations

import json
import logging

from flows import run_report
from pipelines.env import console_logging
from pipelines.stages import summary
from tests.conftest import make_project

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


def test_the_mlflow_link_follows_the_ui_address(tmp_path, monkeypatch):
    import mlflow

    from tasks.stages import _mlflow_link

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
    assert _mlflow_link(root, run_id).startswith(f"[{run_id}](http://127.0.0.1:5000/{page}) (after `mlflow ui")
    monkeypatch.setenv("MLFLOW_UI_URL", "https://mlflow.example.org/team/")
    assert _mlflow_link(root, run_id) == f"[{run_id}](https://mlflow.example.org/team/{page})"
