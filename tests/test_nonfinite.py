"""Non-finite means stop: training stops at the first NaN, evaluation and the export check refuse a NaN policy."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from pipelines.evaluation.stage import NonFiniteWeights, check_finite_weights
from pipelines.grpo.trainer import NonFiniteError, check_finite
from pipelines.registry.parity import ParityError, adapter_effect


def test_training_stops_on_a_non_finite_loss_gradient_or_weight():
    check_finite(3, torch.tensor(0.5), 1.0, [torch.ones(2)])  # all finite: nothing said
    with pytest.raises(NonFiniteError, match="step 3: the loss is nan.*train.temperature"):
        check_finite(3, torch.tensor(math.nan), 1.0)
    with pytest.raises(NonFiniteError, match="step 4: the gradient norm is inf"):
        check_finite(4, torch.tensor(0.5), math.inf)
    with pytest.raises(NonFiniteError, match="step 5: the trainable weights hold NaN or inf"):
        check_finite(5, None, None, [torch.ones(2), torch.tensor([1.0, math.nan])])


def test_evaluate_refuses_a_policy_with_nan_weights(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "adapter_model.safetensors"))
    check_finite_weights(tmp_path)
    save_file({"a": torch.tensor([math.nan, 1.0])}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(NonFiniteWeights, match="holds NaN or inf in 1 tensor"):
        check_finite_weights(tmp_path)


def test_the_export_check_refuses_a_nan_adapter_effect(tmp_path):
    ids = [torch.tensor([1, 2])]
    base = [torch.zeros(2)]
    with pytest.raises(ParityError, match="non-finite log-probs"):
        adapter_effect((ids, [torch.tensor([math.nan, 0.0])], base), 1e-4, tmp_path)
    assert adapter_effect((ids, [torch.tensor([0.5, 0.0])], base), 1e-4, tmp_path) == 0.5


def test_a_tiny_temperature_is_refused_before_anything_runs():
    from pipelines import config

    with pytest.raises(config.ConfigError, match="train.temperature"):
        config.resolve({}, ["train.temperature=1e-300"])


def test_a_nan_loss_stops_training_before_anything_is_saved(tmp_path, tiny_reference, monkeypatch):
    from pipelines.grpo import trainer
    from pipelines.paths import Paths
    from tests.conftest import prepared_project

    cfg = prepared_project(tmp_path / "project", tiny_reference, ["train.checkpoint_every=1", "train.eval_every=0"])
    real = trainer.grpo_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * math.nan, stats

    monkeypatch.setattr(trainer, "grpo_loss", nan_loss)
    paths = Paths(tmp_path / "project")
    with pytest.raises(NonFiniteError, match="training stopped at step 1: the loss is nan"):
        trainer.run(cfg, paths, log_to_mlflow=False)
    assert not paths.policy_dir.exists() and not (paths.checkpoints_dir / "step-000001").exists()
