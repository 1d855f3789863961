"""Each stage on the smoke preset, in order, on a tiny model: real GX, real MLflow (SQLite), real peft."""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines.data import validate
from pipelines.evaluation import stage as evaluate
from pipelines.grpo import trainer
from pipelines.paths import Paths
from pipelines.registry import promotion
from pipelines.registry import stage as registry
from pipelines.snapshot import manifest as pin
from pipelines.snapshot import stage as snapshot
from tests.conftest import download_version


@pytest.fixture
def staged(project, smoke_cfg, tiny_reference):
    """A project whose data is validated and whose reference is the session's tiny snapshot."""
    paths = Paths(project)
    validate.run(smoke_cfg, paths)
    shutil.copytree(tiny_reference, paths.reference_dir)
    return paths


def test_snapshot_tiny_is_pinned(tiny_reference):
    manifest = pin.verify(tiny_reference)
    assert manifest["source"] == "tiny" and manifest["architecture"] == "LlamaForCausalLM"
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    assert manifest["parameters"] > 1_000_000


def test_verify_catches_a_changed_file(tmp_path, tiny_reference):
    copy = shutil.copytree(tiny_reference, tmp_path / "ref")
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    with pytest.raises(pin.SnapshotError, match="config.json"):
        pin.verify(copy)


def test_unknown_source_is_a_clear_error(tmp_path):
    from pipelines.config import SnapshotConfig

    with pytest.raises(snapshot.SnapshotError, match="neither"):
        snapshot.run(SnapshotConfig(source=str(tmp_path / "no-such-model")), Paths(tmp_path))


def test_train_evaluate_register_in_order(staged, smoke_cfg, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    paths = staged
    result = trainer.run(smoke_cfg, paths)
    assert result.steps == 2
    assert (paths.policy_dir / "adapter_model.safetensors").exists()
    assert (paths.policy_dir / "adapter_config.json").exists()
    metrics = json.loads(paths.train_summary.read_text())
    for key in (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "entropy",
        "completions/mean_length",
        "step_time",
    ):
        assert key in metrics
    assert paths.train_plot.read_text().startswith("step,")

    ev = evaluate.run(smoke_cfg, paths)
    assert ev.reference["problems"] == ev.policy["problems"] == 8
    evaluation = json.loads(paths.eval_results.read_text())
    assert {"reference", "policy", "champion", "gain", "comparison"} <= set(evaluation)
    assert evaluation["champion"] is None  # nothing registered yet
    assert {"accuracy", "format_rate", "pass_at_k", "mean_at_k", "maj_at_k"} <= set(evaluation["policy"])
    assert "| metric | reference | candidate |" in paths.eval_report.read_text()  # no champion, no column
    assert len(paths.eval_samples.read_text().splitlines()) == 16

    first = registry.run(smoke_cfg, paths)
    # No champion yet, so the candidate must beat the reference; the tiny random model scores 0 like
    # its reference, so v1 stays challenger and the reason says why.
    assert not first.promoted and first.version == "1"
    assert first.reason.startswith("no champion yet, so the candidate must beat the reference: failed min_gain")
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("grpo-policy", "challenger").version) == "1"
    assert promotion.current_champion(client, "grpo-policy") is None
    # The rest is about a champion: make v1 one by hand, the path the gate does not block.
    promotion.promote(client, "grpo-policy", "1", "baseline for the next candidate", user="test")
    assert str(client.get_model_version_by_alias("grpo-policy", "champion").version) == "1"
    run = client.get_run(first.run_id)
    assert run.info.run_id == result.run_id  # one MLflow run: training metrics and registration
    assert "reward" in run.data.metrics and "test/policy/accuracy" in run.data.metrics
    # The training run names its data: the validated splits as a dataset input with their digest.
    digest = json.loads(paths.validation_report.read_text())["digest"]
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == digest[:32]
    assert {t.key: t.value for t in inputs[0].tags}["dataset_digest"] == digest
    tags = client.get_model_version("grpo-policy", "1").tags
    assert tags["reference_sha256"] == json.loads((paths.reference_dir / "manifest.json").read_text())["sha256"]
    assert tags["dataset_digest"] == json.loads(paths.validation_report.read_text())["digest"]
    assert tags["git_commit"]

    # A second candidate with the same accuracy on the same problems (the champion is re-scored
    # by `evaluate`) does not take champion: it must beat it.
    assert evaluate.run(smoke_cfg, paths).champion_version == "1"
    second = registry.run(smoke_cfg, paths)
    assert second.version == "2" and not second.promoted and "failed min_gain" in second.reason
    assert str(client.get_model_version_by_alias("grpo-policy", "challenger").version) == "2"
    assert str(client.get_model_version_by_alias("grpo-policy", "champion").version) == "1"
    assert json.loads(paths.registry_report.read_text())["promoted"] is False
    # Registered again from the same training run: both versions are made from the same LoggedModel
    # (the checkpoint that holds the evaluated weights), so the UI links each to it.
    v1, v2 = (client.get_model_version("grpo-policy", v) for v in ("1", "2"))
    assert v2.source == v1.source and v1.source.startswith("models:/m-")
    # The reference is logged once per sha256, not once per version.
    assert len(client.search_model_versions("name='grpo-policy-reference'")) == 1

    # Loads back offline with plain transformers + peft, from the registry's copies.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir = download_version("grpo-policy", "champion", tmp_path / "dl")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    ids = tokenizer("What is 2 + 2?", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    mlflow.set_tracking_uri(None)
