"""Each built-in task and a user's task through the pipeline, each judged by its own judge.

countdown and choice run the stages directly (validate, train, evaluate) on the tiny model; the
user's task (tests/fixtures/even_task.py) runs through `grpo run --preset smoke` (Prefect and DVC),
reaches the registry with its hash, and a change to its file makes DVC re-run what depends on it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env, make_project

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["countdown", "choice"])
def test_builtin_task_trains_and_is_judged_by_its_own_judge(tmp_path, tiny_reference, name):
    from pipelines import config
    from pipelines.data import validate
    from pipelines.evaluation import stage as evaluate
    from pipelines.grpo import trainer
    from pipelines.io import read_jsonl
    from pipelines.paths import Paths
    from pipelines.verifiers import catalog

    root = make_project(tmp_path / "project")
    cfg = config.load(root / "params.yaml", [f"task={name}", "evaluate.champion=false"], preset="smoke")
    paths = Paths(root)
    validate.run(cfg, paths)
    report = json.loads(paths.validation_report.read_text())
    assert report["task"] == name
    assert any(e["column"] == "task_issue" and e["success"] for e in report["expectations"])
    train = read_jsonl(paths.train_split)
    task = catalog.load(name, root)
    assert all(c in train[0] for c in task.columns)
    # The task's prompt: its instruction and worked example, not math's.
    user_turns = [m["content"] for m in train[0]["prompt"] if m["role"] == "user"]
    assert all(t.endswith(task.instruction.split("{question}")[1]) for t in user_turns)
    shutil.copytree(tiny_reference, paths.reference_dir)
    trainer.run(cfg, paths, log_to_mlflow=False)
    summary = json.loads(paths.train_summary.read_text())
    assert summary["task"] == name and set(summary["verifiers"]) == set(task.reward_names)
    evaluate.run(cfg, paths)
    evaluation = json.loads(paths.eval_results.read_text())
    assert evaluation["task"]["name"] == name
    assert evaluation["verifiers"] == catalog_versions(task, ["judge"])
    agreement = evaluation["agreement"]
    assert agreement["checked"] > 0 and agreement["disagreements"] == 0
    # A verdict computed another way: the task's correctness reward on the same completions.
    from pipelines.config import RewardSpec
    from pipelines.grpo.reward_runner import score

    rows = {r["id"]: r for r in read_jsonl(paths.eval_split)}
    samples = read_jsonl(paths.eval_samples)
    texts = [s["completion"] for s in samples]
    scored_rows = [rows[s["id"]] for s in samples]
    rewards, _ = score([RewardSpec(name=task.correctness)], scored_rows, texts, 1, timeout=30, task=task)
    assert [s["correct"] for s in samples] == [v == 1.0 for v in rewards[:, 0].tolist()]
    assert f"task `{name}`" in paths.eval_report.read_text()


def catalog_versions(task, names):
    from pipelines.verifiers.versions import verifier_versions

    return verifier_versions(task, names)


def _run(cwd, *args, check=True):
    proc = subprocess.run(args, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_user_task_file_runs_end_to_end_and_is_a_dvc_dependency(tmp_path):
    root = make_project(tmp_path / "project", dvc=True)
    (root / "tests" / "fixtures").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "fixtures" / "even_task.py", root / "tests" / "fixtures" / "even_task.py")
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-qm", "my task")
    grpo = [sys.executable, "-m", "flows.cli"]
    _run(root, *grpo, "run", "--preset", "smoke", "-S", "task=tests/fixtures/even_task.py:TASK")
    params = (root / "params.yaml").read_text()
    assert "task: tests/fixtures/even_task.py:TASK" in params and "task_file: tests/fixtures/even_task.py" in params
    evaluation = json.loads((root / "reports" / "eval.json").read_text())
    assert evaluation["task"] == {
        "name": "even",
        "description": "yes or no after ####",
        "lenient": "the last yes or no anywhere",
    }
    assert "task `even`" in (root / "reports" / "eval.md").read_text()
    samples = [json.loads(line) for line in (root / "reports" / "eval-samples.jsonl").read_text().splitlines()]
    assert samples and all(s["answer"] in ("yes", "no") for s in samples)

    # The registered version names the task and carries the hash of the user's file.
    import mlflow
    from mlflow import MlflowClient

    from pipelines.verifiers import catalog

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    version = MlflowClient().get_model_version("grpo-policy", "1")
    task = catalog.load("tests/fixtures/even_task.py:TASK", root)
    assert version.tags["task"] == "even"
    assert version.tags["verifier_judge_sha256"] == catalog_versions(task, ["judge"])["judge"]
    assert version.tags["verifier_even_correct_sha256"] == catalog_versions(task, ["even_correct"])["even_correct"]
    metrics = MlflowClient().get_run(version.run_id).data.metrics
    assert metrics["test/judge_reward_disagreement"] == 0.0  # the judge re-read training's last ledger step

    # The file is a dependency: a change to it makes validate, train, evaluate and register stale.
    dvc = [sys.executable, "-m", "dvc"]
    assert json.loads(_run(root, *dvc, "status", "--json").stdout) == {}
    lock = (root / "dvc.lock").read_text()
    assert "path: tests/fixtures/even_task.py" in lock
    with (root / "tests" / "fixtures" / "even_task.py").open("a") as fh:
        fh.write("\n# changed\n")
    stale = json.loads(_run(root, *dvc, "status", "--json").stdout)
    assert set(stale) == {"validate", "train", "evaluate", "register"}
    dry = _run(root, *dvc, "repro", "--dry").stdout
    assert "Running stage 'validate'" in dry and "Running stage 'snapshot'" not in dry
