"""The training run's MLflow record: a table of sample completions that grows step by step, the source tags, the
description and the system metrics MLflow's UI shows, in an experiment marked as model training."""

from __future__ import annotations

import os

import torch

from tests.conftest import prepared_project


def test_each_step_adds_its_samples_to_one_mlflow_table_quietly(tmp_path, tiny_reference, capfd, monkeypatch):
    import mlflow

    from pipelines.grpo.run_logger import RunLogger
    from pipelines.paths import Paths

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    cfg = prepared_project(tmp_path / "project", tiny_reference, ["train.log_samples=3"])
    G = cfg.train.num_generations
    logger = RunLogger(Paths(tmp_path / "project"), cfg, enabled=True)
    rows = [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}]}, {"prompt": "What is 4 + 4?"}]
    for step in (1, 2):
        texts = [f"step {step} completion {i}" for i in range(2 * G)]
        rewards = torch.arange(2 * G, dtype=torch.float32)
        logger.step(step, {"reward": 0.5, "kl": float("nan")}, rows, texts, rewards, -rewards / 10)
    long = "Let me add them. " * 20 + "#### 5"  # longer than any table cell shows
    rewards = torch.tensor([0.2, 1.2] * G, dtype=torch.float32)  # float32: 0.200000003 unrounded
    logger.step(3, {"reward": 0.7}, rows, [long] * (2 * G), rewards, torch.full((2 * G,), 0.70710678))
    logger.finish(None)
    # log_table downloads the table to append to it; MLflow's bar for that stays off the console.
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # set for the call only

    table = mlflow.load_table("completions.json", run_ids=[logger.run_id])
    assert table["step"].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert list(table.columns) == ["step", "reward", "advantage", "prompt", "completion"]  # the short ones first
    assert table["completion"].tolist()[3:6] == ["step 2 completion 0", "step 2 completion 1", "step 2 completion 2"]
    assert table["prompt"].tolist()[:3] == ["What is 2 + 3?"] * 3  # the user's turn, not the whole chat
    assert table["reward"].tolist()[:3] == [0.0, 1.0, 2.0]
    # Rounded to 3 decimals; the advantages training gave, as it gave them.
    assert table["reward"].tolist()[6:] == [0.2, 1.2, 0.2] and table["advantage"].tolist()[6:] == [0.707] * 3
    assert table["advantage"].tolist()[:3] == [-0.0, -0.1, -0.2]
    # Each step's samples in full, as Markdown.
    shown = mlflow.artifacts.load_text(f"runs:/{logger.run_id}/completions/step-000003.md")
    assert shown.count(long) == 3 and "reward 0.200, advantage +0.707: What is 2 + 3?" in shown
    history = mlflow.tracking.MlflowClient().get_metric_history(logger.run_id, "reward")
    assert [m.step for m in history] == [1, 2, 3]


def test_clip_ratios_are_charted_only_once_one_is_not_zero(tmp_path, tiny_reference):
    """On policy every clip ratio is 0: three flat charts that pushed the training curves down the run page."""
    import mlflow

    from pipelines.grpo.run_logger import RunLogger
    from pipelines.paths import Paths

    cfg = prepared_project(tmp_path / "project", tiny_reference, ["train.log_samples=0"])
    logger = RunLogger(Paths(tmp_path / "project"), cfg, enabled=True)
    for step, high in ((1, 0.0), (2, 0.0), (3, 0.25), (4, 0.0)):
        metrics = {"loss": 0.1, "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": high}
        logger.step(step, metrics, [], [], torch.zeros(0), torch.zeros(0))
    logger.finish(None, {"steps": 4, "selected_step": 4})
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(logger.run_id)
    assert "clip_ratio/low_mean" not in run.data.metrics and "loss" in run.data.metrics
    high = client.get_metric_history(logger.run_id, "clip_ratio/high_mean")
    assert [(m.step, m.value) for m in sorted(high, key=lambda m: m.step)] == [(1, 0), (2, 0), (3, 0.25), (4, 0)]
    assert "**not charted**: `clip_ratio/low_mean`, 0 at every step" in run.data.tags["mlflow.note.content"]


def _git_repo(root) -> str:
    """Make `root` a git repository with everything committed; its HEAD commit."""
    import subprocess

    run = lambda *cmd: subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "add", "-A")
    run("git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "commit", "-qm", "project")
    return run("git", "rev-parse", "HEAD").stdout.strip()


def test_training_run_has_source_tags_a_description_system_metrics_and_a_model_training_experiment(
    tmp_path, tiny_reference, capfd, monkeypatch
):
    """What MLflow's UI shows natively: source and commit, a description, CPU and memory, the experiment kind."""
    import time

    import mlflow

    from pipelines.grpo.run_logger import RunLogger
    from pipelines.paths import Paths

    # Sampled often enough to land in a test of a second (the pipeline's default is SYSTEM_METRICS_INTERVAL_S).
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    cfg = prepared_project(tmp_path / "project", tiny_reference, [])
    commit = _git_repo(tmp_path / "project")
    logger = RunLogger(Paths(tmp_path / "project"), cfg, enabled=True)
    client = mlflow.tracking.MlflowClient()
    running = client.get_run(logger.run_id).data.tags["mlflow.note.content"]
    assert "preset `smoke`" in running and "(running)" in running
    logger.step(1, {"reward": 0.25, "kl": 0.01}, [{"prompt": "What is 1 + 1?"}], ["2"], torch.zeros(1), torch.zeros(1))
    time.sleep(0.6)
    summary = {
        "reward": 0.25,
        "kl": 0.01,
        "steps": 2,
        "select": "best",
        "selected_step": 1,
        "validation": {"best_step": 1, "best_accuracy": 0.5, "last_step": 2, "last_accuracy": 0.25,
                       "reference_accuracy": 0.125, "alarms": [], "stop_reason": None},
    }  # fmt: skip
    logger.finish(None, summary)

    run = client.get_run(logger.run_id)
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "grpo train" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == commit
    note = tags["mlflow.note.content"]
    assert "preset `smoke`" in note and "`generator:math`" in note and "2 of 2" in note
    assert "selected step 1" in note and "validation accuracy 0.500" in note and "reward 0.250" in note
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI view
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    assert "monitoring system metrics" not in capfd.readouterr().err  # MLflow's notices stay off the console


def test_system_metrics_interval_is_set_for_the_start_only_and_a_chosen_experiment_kind_stays(tmp_path, monkeypatch):
    import mlflow

    from pipelines import mlflow_store
    from pipelines.grpo import run_logger

    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    with run_logger._system_metrics_settings():
        assert os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] == str(run_logger.SYSTEM_METRICS_INTERVAL_S)
    assert "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ

    # An experiment made before (no kind) gets it; one whose kind a person chose in the UI keeps it.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    old = mlflow.create_experiment("old")
    chosen = mlflow.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    mlflow_store.setup(tmp_path, "old")
    mlflow_store.setup(tmp_path, "chosen")
    client = mlflow.tracking.MlflowClient()
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"
    mlflow.set_tracking_uri(None)
