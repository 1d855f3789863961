"""Checkpoints as MLflow 3 LoggedModels: one per validated step of a tiny training run on a SQLite store, their
validation metrics tied to the run's dataset, ranked by accuracy, and one registered with `grpo promote --checkpoint`.

The tiny random model scores 0 on every validation, so the validation figures are chosen (a stand-in for
`score_split`): step 2 is the best, step 3 the last; with one checkpoint kept, step 1's weights are pruned.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.grpo import logged_models
from pipelines.grpo.validation import Score
from pipelines.paths import Paths
from tests.conftest import prepared_project

NAME = "grpo-policy"
# step -> (accuracy, lenient accuracy, format rate) on the validation split
FIGURES = {0: (0.0, 0.1, 0.2), 1: (0.25, 0.3, 0.5), 2: (0.75, 0.8, 0.9), 3: (0.5, 0.6, 0.7)}
OVERRIDES = [
    "train.steps=3",
    "train.eval_every=1",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=1",
    "train.log_samples=0",
    "train.ledger_every=0",
]


def _chosen_score(model, tokenizer, rows, *, step, **_):
    accuracy, lenient, fmt = FIGURES[step]
    return Score(step, accuracy, lenient, fmt, seconds=0.01)


# mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; each test finds its store from its project.
pytestmark = pytest.mark.usefixtures("fresh_tracking_uri")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_reference):
    """A 3-step run with MLflow logging on: (cfg, paths, training result, seconds the checkpoint models took)."""
    import time

    import mlflow

    from pipelines.grpo import trainer

    # Module-scoped, so set up before the autouse fixture: clear a URI an earlier test module exported.
    mlflow.set_tracking_uri(None)
    root = tmp_path_factory.mktemp("logged-models") / "project"
    cfg = prepared_project(root, tiny_reference, OVERRIDES)
    paths = Paths(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "score_split", _chosen_score)
        spent = []
        real = logged_models.log_checkpoints

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - started)

        mp.setattr(logged_models, "log_checkpoints", timed)
        result = trainer.run(cfg, paths)
    return cfg, paths, result, spent


def _models(run_id: str) -> dict[int, object]:
    import mlflow

    models = mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'", output_format="list")
    steps = [int(m.tags["step"]) for m in models]
    assert len(steps) == len(set(steps)), f"a step logged twice: {sorted(steps)}"
    return {int(m.tags["step"]): m for m in models}


def test_each_validated_step_is_a_logged_model_with_its_metrics_tied_to_the_dataset(trained):
    import mlflow
    from mlflow import MlflowClient

    cfg, paths, result, spent = trained
    print(f"checkpoint models took {spent[0]:.2f} s")
    mlflow.set_tracking_uri(f"sqlite:///{paths.root / 'mlflow.db'}")
    client = MlflowClient()
    models = _models(result.run_id)
    assert sorted(models) == [1, 2, 3]  # every validated step but the reference's (step 0)
    run = client.get_run(result.run_id)
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
    for step, model in models.items():
        assert model.name == f"step-{step:06d}" and model.model_type == logged_models.MODEL_TYPE
        assert model.source_run_id == result.run_id
        assert model.tags["selected"] == str(step == 2).lower()  # train.select=best: step 2
        assert model.params["train.learning_rate"] == str(cfg.train.learning_rate)
        assert model.params["train.lora.r"] == "4"
        metrics = {m.key: m for m in model.metrics}
        assert {"eval/accuracy", "eval/lenient_accuracy", "eval/format_rate"} <= set(metrics)
        assert metrics["eval/accuracy"].value == FIGURES[step][0] and metrics["eval/accuracy"].step == step
        for metric in metrics.values():
            assert metric.model_id == model.model_id
            assert (metric.dataset_name, metric.dataset_digest) == (dataset.name, dataset.digest)
    # Weights: step 2 from checkpoints/best, step 3 the one kept; step 1 rotated away, and it says so: not READY
    # (the UI's "Ready" next to "No Artifacts Recorded"), but FAILED with a description of what it is.
    assert models[1].tags["weights"] == logged_models.PRUNED
    assert str(models[1].status) == "FAILED" and logged_models.WEIGHTS_SHA256 not in models[1].tags
    note = models[1].tags[logged_models.NOTE]
    assert note.startswith("**Metrics only, not registrable**") and "train.keep_checkpoints=1" in note
    assert "Steps with weights: 2, 3." in note
    assert [str(models[s].status) for s in (2, 3)] == ["READY", "READY"]
    assert "grpo promote --checkpoint 2" in models[2].tags[logged_models.NOTE]
    assert models[2].tags["checkpoint_path"] == "checkpoints/best"
    assert models[3].tags["checkpoint_path"] == "checkpoints/step-000003"
    assert not client.list_logged_model_artifacts(models[1].model_id)
    # Each uploaded adapter holds its own step's weights, not the live model's.
    from safetensors.torch import load_file

    for step, folder in ((2, "best"), (3, "step-000003")):
        assert models[step].tags["weights"] == logged_models.LOGGED
        local = mlflow.artifacts.download_artifacts(f"{models[step].artifact_location}/adapter_model.safetensors")
        adapter = load_file(local)
        saved = load_file(str(paths.checkpoints_dir / folder / "trainable.safetensors"))
        assert saved and all((adapter[k.replace(".default", "")] == v).all() for k, v in saved.items())
    # Logged again with the model id, the run's own points are not doubled.
    assert [m.step for m in client.get_metric_history(result.run_id, "eval/accuracy")] == [0, 1, 2, 3]
    # The selected step's weights are models/policy's, byte for byte: `grpo register` finds it by this hash.
    from pipelines.hashing import file_hash

    weights = file_hash(paths.policy_dir / "adapter_model.safetensors")
    assert models[2].tags[logged_models.WEIGHTS_SHA256] == weights != models[3].tags[logged_models.WEIGHTS_SHA256]
    # The run lists them as its outputs, at their steps.
    assert sorted(o.step for o in run.outputs.model_outputs) == [1, 2, 3]


def test_checkpoints_rank_by_validation_accuracy_and_resume_logs_none_twice(trained, tiny_reference):
    import mlflow

    from pipelines.grpo import trainer

    cfg, paths, result, _ = trained
    mlflow.set_tracking_uri(f"sqlite:///{paths.root / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name(cfg.registry.experiment).experiment_id
    ranked = mlflow.search_logged_models(
        experiment_ids=[experiment],
        filter_string=f"model_type = '{logged_models.MODEL_TYPE}'",
        order_by=[{"field_name": "metrics.eval/accuracy", "ascending": False}],
        output_format="list",
    )
    assert [m.tags["step"] for m in ranked] == ["2", "3", "1"]
    before = {s: m.model_id for s, m in _models(result.run_id).items()}
    again = trainer.run(cfg, paths)  # resumes at the end, in the same run
    assert again.run_id == result.run_id and again.resumed_from == 3
    assert {s: m.model_id for s, m in _models(result.run_id).items()} == before


def test_promote_checkpoint_registers_a_loadable_champion_and_refuses_a_pruned_one(trained, monkeypatch, capsys):
    import mlflow
    from mlflow import MlflowClient

    from flows.cli import main

    cfg, paths, result, _ = trained
    common = ["--project", str(paths.root), "--preset", "smoke", *(x for o in OVERRIDES for x in ("-S", o))]
    monkeypatch.setenv("USER", "alice")
    assert main(["promote", "--checkpoint", "1", "--reason", "try it", *common]) == 1
    err = capsys.readouterr().err
    assert "step 1" in err and "pruned by train.keep_checkpoints" in err and "with weights: 2, 3" in err
    assert main(["promote", "1", "--checkpoint", "2", "--reason", "both", *common]) == 2  # one of the two
    capsys.readouterr()

    # The export-parity check loads the logged model in a fresh process before any version exists; when
    # what it loads differs from the checkpoint's adapter, nothing is registered and the model says why.
    from pipelines.mlflow_store import registry_client
    from pipelines.registry import parity
    from pipelines.registry.checkpoints import promote_checkpoint
    from pipelines.registry.promotion import PromotionError

    honest = parity.run_probe

    def damaged(model_uri, texts, timeout_s=900.0, device="cpu"):
        got = honest(model_uri, texts, timeout_s, device)
        return {k: (v + 0.5 if k.startswith("pyfunc/") else v) for k, v in got.items()}

    monkeypatch.setattr(parity, "run_probe", damaged)
    client = registry_client(paths.root)
    with pytest.raises(PromotionError, match=r"export-parity check failed, nothing registered: .*mlflow\.pyfunc"):
        promote_checkpoint(client, cfg, paths, "2", "checked")
    assert not client.search_model_versions(f"name='{NAME}'")
    assert _models(result.run_id)[2].tags["export_parity"].startswith("failed: ")
    monkeypatch.setattr(parity, "run_probe", honest)

    assert main(["promote", "--checkpoint", "2", "--reason", "best validated step", *common]) == 0
    out = capsys.readouterr().out
    assert f"{NAME} v1 registered from checkpoint step 2" in out and "accuracy 0.750" in out
    assert "is champion (was v-); promoted by alice: best validated step" in out
    client = MlflowClient()
    version = client.get_model_version_by_alias(NAME, "champion")
    step2 = _models(result.run_id)[2]
    # The version is the logged model's files (the SQLite registry keeps the link in `source`, not model_id).
    assert str(version.version) == "1" and version.source == f"models:/{step2.model_id}"
    assert version.tags["checkpoint_model_id"] == step2.model_id
    assert '"version": "1"' in step2.tags["mlflow.modelVersions"]  # and the logged model names its version
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"
    assert version.tags["checkpoint_step"] == "2" and version.tags["validation_accuracy"] == "0.75"
    assert version.tags["promoted_by"] == "alice" and version.tags["reference_model_uri"].startswith("models:/")
    assert _models(result.run_id)[2].tags["export_parity"].startswith("pyfunc max |Δlog p| ")
    answers = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(["What is 2 + 3?"])
    assert len(answers) == 1 and isinstance(answers[0], str)
    assert Path(paths.root / "mlflow.db").exists()


def test_register_makes_the_version_from_the_selected_steps_logged_model(trained):
    """`grpo register` adds the pyfunc files to the checkpoint model that holds the evaluated adapter (step 2,
    selected) and registers that model: the Models tab and the registry name the same one, both ways."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.registry import stage as registry
    from tests.test_registry import BETTER, WORSE, fake_evaluation

    # The register stage names training's models and tags without importing training's code.
    assert registry.CHECKPOINT_TYPE == logged_models.MODEL_TYPE
    for name in ("WEIGHTS_SHA256", "ADAPTER_WEIGHTS", "STEP", "SELECTED", "NOTE"):
        assert getattr(registry, name) == getattr(logged_models, name), name
    cfg, paths, result, _ = trained
    cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"export_check": False})})
    mlflow.set_tracking_uri(f"sqlite:///{paths.root / 'mlflow.db'}")
    client = MlflowClient()
    champion = [v for v in client.search_model_versions(f"name='{NAME}'") if "champion" in v.aliases]
    fake_evaluation(cfg, paths, BETTER, WORSE if champion else None, champion[0].version if champion else None)
    before = {m.model_id for m in mlflow.search_logged_models(output_format="list")}
    done = registry.run(cfg, paths)
    step2 = _models(result.run_id)[2]
    version = client.get_model_version(NAME, done.version)
    assert version.source == f"models:/{step2.model_id}" and version.run_id == result.run_id
    assert {m.model_id for m in mlflow.search_logged_models(output_format="list")} == before  # no copy of it
    assert {"name": NAME, "version": done.version} in json.loads(step2.tags["mlflow.modelVersions"])
    assert str(step2.status) == "READY" and step2.tags["selected"] == "true"
    # Its files: the evaluated weights, byte for byte, as a pyfunc model (made so by `grpo promote --checkpoint 2`
    # above: a registered model's files are not rewritten).
    from pipelines.hashing import file_hash

    got = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{done.version}", dst_path=str(paths.root / "dl")))
    weights = "adapter_model.safetensors"
    assert file_hash(got / weights) == file_hash(paths.policy_dir / weights) and (got / "MLmodel").exists()
    assert [p.name for p in mlflow.models.get_model_info(f"models:/{NAME}/{done.version}").signature.params] == [
        "max_new_tokens"
    ]
