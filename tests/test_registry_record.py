"""What a registration leaves in MLflow for a reader: a version with the tags one looks it up by (no "None"),
the rest of its record in one JSON, a LoggedModel it is made from, and a run page whose few held-out
charts do not push the training curves out of sight (every other test figure is in a table)."""

from __future__ import annotations

import pytest

from pipelines.registry import lineage
from pipelines.registry import stage as registry
from tests.test_registry import BETTER, NAME, build_project, fake_evaluation


@pytest.fixture(autouse=True)
def _fresh_tracking_uri():
    import mlflow

    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(None)


def test_a_version_carries_the_tags_a_reader_needs_and_its_record_in_one_json(tmp_path, tiny_reference):
    import mlflow
    from mlflow import MlflowClient

    cfg, paths = build_project(tmp_path / "project", tiny_reference)
    fake_evaluation(cfg, paths, BETTER, None, None)
    done = registry.run(cfg, paths)
    client = MlflowClient()
    version = client.get_model_version(NAME, done.version)
    tags = version.tags

    assert not [k for k, v in tags.items() if v in ("None", "")], tags
    assert len(tags) <= 22 and any(k.startswith(lineage.VERIFIER_PREFIX) for k in tags), sorted(tags)
    for key in ("git_commit", "dataset_digest", "reference_model_uri", "eval_accuracy", "promotion_decision"):
        assert tags[key]
    assert not {"promotion", "promotion_checks", "eval_k", "git_dirty_means", "dvc_train_data_md5"} & set(tags)

    # The whole record: every tag, and what the tags leave out.
    record = mlflow.artifacts.load_dict(tags["lineage"])
    made = {k: v for k, v in tags.items() if k not in ("promoted_by", "promoted_at")}  # set by the promotion
    assert made.items() <= record.items()
    assert {"eval_k", "eval_mean_at_k", "dvc_train_data_md5", "git_dirty_means", "promotion_checks"} <= set(record)
    assert registry.run(cfg, paths).checks == done.checks  # a registration made before reads its checks back
    assert "None" not in record.values() and record["logged_model_id"] == version.source.removeprefix("models:/")

    # Made from a LoggedModel of the run (no training run here: a `policy` model of its own), listed both ways.
    model = client.get_logged_model(record["logged_model_id"])
    assert version.source == f"models:/{model.model_id}" and model.source_run_id == version.run_id
    assert str(model.status) == "READY" and model.model_type == registry.POLICY_MODEL_TYPE
    assert f'"version": "{done.version}"' in model.tags["mlflow.modelVersions"]
    assert {a.path for a in client.list_logged_model_artifacts(model.model_id)} >= {"MLmodel", "adapter_config.json"}


def test_the_run_charts_a_few_held_out_figures_and_tables_the_rest(tmp_path, tiny_reference):
    import mlflow
    from mlflow import MlflowClient

    cfg, paths = build_project(tmp_path / "project", tiny_reference)
    fake_evaluation(cfg, paths, BETTER, None, None)
    done = registry.run(cfg, paths)
    run = MlflowClient().get_run(done.run_id)
    charted = sorted(k for k in run.data.metrics if k.startswith("test/"))
    assert charted == ["test/gain_vs_reference", "test/policy/accuracy", "test/reference/accuracy"]

    records = mlflow.artifacts.load_dict(MlflowClient().get_model_version(NAME, done.version).tags["lineage"])
    folder = records["lineage"].rsplit("/", 1)[0].split("/", 3)[-1]  # runs:/<run>/<folder>/lineage.json
    table = mlflow.load_table(f"{folder}/test-figures.json", run_ids=[done.run_id])
    assert table["model"].tolist() == ["reference", "policy"]
    assert {"accuracy", "pass_at_k", "format_rate", "k", "problems"} <= set(table.columns)
    numbers = [v for col in table.columns if col != "model" for v in table[col].tolist() if isinstance(v, float)]
    assert numbers and all(v == round(v, registry.DECIMALS) for v in numbers)
