"""The training run's MLflow record: one table of sample completions that grows step by step."""

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
        logger.step(step, {"reward": 0.5, "kl": float("nan")}, rows, texts, torch.arange(2 * G, dtype=torch.float32))
    logger.finish(None)
    # log_table downloads the table to append to it; MLflow's bar for that stays off the console.
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # set for the call only

    table = mlflow.load_table("completions.json", run_ids=[logger.run_id])
    assert table["step"].tolist() == [1, 1, 1, 2, 2, 2]
    assert table["completion"].tolist()[3:] == ["step 2 completion 0", "step 2 completion 1", "step 2 completion 2"]
    assert table["prompt"].tolist()[:3] == ["What is 2 + 3?"] * 3  # the user's turn, not the whole chat
    assert table["reward"].tolist()[:3] == [0.0, 1.0, 2.0]
    history = mlflow.tracking.MlflowClient().get_metric_history(logger.run_id, "reward")
    assert [m.step for m in history] == [1, 2]
