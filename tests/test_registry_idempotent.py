"""One registration is one version: a create whose answer was lost, a kill after the create, and
MLflow's own retries all end with a single version that carries its decision and the alias."""

from __future__ import annotations

import pytest

from tests.test_registry import BETTER, NAME, build_project, fake_evaluation


@pytest.fixture(autouse=True)
def _fresh_tracking_uri():
    import mlflow

    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(None)


def _versions(client):
    return sorted(client.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))


def test_a_create_whose_answer_was_lost_is_finished_not_repeated(tmp_path, tiny_reference, monkeypatch):
    import requests
    from mlflow import MlflowClient

    from pipelines.registry import stage as registry

    cfg, paths = build_project(tmp_path / "project", tiny_reference)
    fake_evaluation(cfg, paths, BETTER, None, None)
    real = MlflowClient.create_model_version

    def lost_answer(self, *args, **kwargs):
        if args[0] != NAME:  # the reference's own model
            return real(self, *args, **kwargs)
        real(self, *args, **kwargs)  # the server made it...
        raise requests.exceptions.ReadTimeout("read timed out")  # ...and the client never heard

    monkeypatch.setattr(MlflowClient, "create_model_version", lost_answer)
    first = registry.run(cfg, paths)  # the lost answer is found again, not retried blindly
    monkeypatch.setattr(MlflowClient, "create_model_version", real)
    again = registry.run(cfg, paths)  # what a retry of the task does: the same registration, finished
    client = MlflowClient()
    versions = _versions(client)
    assert [str(v.version) for v in versions] == ["1"] and first.version == again.version == "1"
    assert versions[0].tags["promotion_decision"] == "promoted" and first.promoted and again.promoted
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"


def test_a_kill_right_after_the_create_leaves_a_decided_version_that_the_rerun_completes(
    tmp_path, tiny_reference, monkeypatch
):
    from mlflow import MlflowClient

    from pipelines.registry import stage as registry

    cfg, paths = build_project(tmp_path / "project", tiny_reference)
    fake_evaluation(cfg, paths, BETTER, None, None)
    real_alias = MlflowClient.set_registered_model_alias

    def killed(self, *args, **kwargs):
        if args[0] != NAME:
            return real_alias(self, *args, **kwargs)
        raise KeyboardInterrupt  # the process dies between the create and the alias

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", killed)
    with pytest.raises(KeyboardInterrupt):
        registry.run(cfg, paths)
    client = MlflowClient()
    (made,) = _versions(client)
    assert made.tags["promotion_decision"] == "promoted" and not made.aliases  # decided at creation
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real_alias)
    done = registry.run(cfg, paths)
    assert done.version == "1" and done.promoted and [str(v.version) for v in _versions(client)] == ["1"]
    assert set(client.get_model_version("grpo-policy", "1").aliases) == {"champion", "challenger"}


def test_duplicates_made_by_http_retries_are_folded_into_one(tmp_path, tiny_reference, monkeypatch):
    from mlflow import MlflowClient

    from pipelines.registry import stage as registry

    cfg, paths = build_project(tmp_path / "project", tiny_reference)
    fake_evaluation(cfg, paths, BETTER, None, None)
    real = MlflowClient.create_model_version

    def retried(self, *args, **kwargs):
        if args[0] != NAME:
            return real(self, *args, **kwargs)
        real(self, *args, **kwargs)  # the first attempt reached the server
        return real(self, *args, **kwargs)  # the retry made a second one

    monkeypatch.setattr(MlflowClient, "create_model_version", retried)
    result = registry.run(cfg, paths)
    versions = _versions(MlflowClient())
    assert [str(v.version) for v in versions] == [result.version] == ["1"]
