"""The export-parity check at registration (pipelines/registry/parity.py): the logged files, loaded in a
fresh process through mlflow.pyfunc and through transformers + peft, give the evaluated policy's
log-probs; a corrupted export or an adapter that does nothing blocks registration."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipelines import mlflow_store
from pipelines.registry import parity
from pipelines.registry import stage as registry
from tests.test_registry import BETTER, WORSE, build_project, fake_evaluation

NAME = "grpo-policy"


def _expected(texts: int = 2, effect: float = 0.5):
    torch.manual_seed(0)
    ids = [torch.tensor([1, 2, 3]) for _ in range(texts)]
    policy = [torch.log_softmax(torch.randn(3, 11), dim=-1) for _ in range(texts)]
    base = [p + effect for p in policy]
    return ids, policy, base


def _probed(expected, shift: float = 0.0, ids=None):
    got = {}
    for i, (tokens, lp) in enumerate(zip(expected[0], expected[1], strict=True)):
        got[f"ids/{i}"] = ids if ids is not None else tokens
        got[f"pyfunc/{i}"] = lp.clone()
        got[f"peft/{i}"] = lp.clone() + (shift if i == 1 else 0.0)
    return got


def test_compare_passes_an_identical_export_and_reports_the_adapter_effect():
    expected = _expected()
    pyfunc, peft, effect = parity.compare(expected, _probed(expected, shift=5e-5), 1e-4, "runs:/r/policy")
    assert pyfunc == 0.0 and peft == pytest.approx(5e-5, rel=1e-2) and effect == pytest.approx(0.5)


def test_compare_names_the_loader_the_text_and_the_size_of_a_difference():
    expected = _expected()
    with pytest.raises(parity.ParityError, match=r"transformers \+ peft differs .* 0\.01 > registry\.export_atol"):
        parity.compare(expected, _probed(expected, shift=0.01), 1e-4, "runs:/r/policy")
    with pytest.raises(parity.ParityError, match="probe text 1"):
        parity.compare(expected, _probed(expected, shift=0.01), 1e-4, "runs:/r/policy")


def test_compare_refuses_another_tokenizer_and_a_no_op_adapter():
    expected = _expected()
    with pytest.raises(parity.ParityError, match="another tokenizer"):
        parity.compare(expected, _probed(expected, ids=torch.tensor([1, 2, 4])), 1e-4, "runs:/r/policy")
    no_op = _expected(effect=0.0)
    with pytest.raises(parity.ParityError, match="does not change the base model"):
        parity.compare(no_op, _probed(no_op), 1e-4, "runs:/r/policy")


@pytest.fixture(autouse=True)
def _fresh_tracking_uri():
    import mlflow

    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(None)


def _set_lora_b(policy_dir: Path, scale: float | None) -> None:
    """Rewrite the adapter's LoRA B matrices: scaled by `scale`, or zero (an untrained adapter) when None."""
    from safetensors.torch import load_file, save_file

    path = policy_dir / "adapter_model.safetensors"
    weights = load_file(str(path))
    for key in weights:
        if "lora_B" in key:
            weights[key] = torch.zeros_like(weights[key]) if scale is None else weights[key] * scale
    save_file(weights, str(path), metadata={"format": "pt"})


def test_registration_is_blocked_by_a_corrupted_export_and_by_a_no_op_adapter(tmp_path, tiny_reference, monkeypatch):
    cfg, paths = build_project(tmp_path / "project", tiny_reference, export_check=True)
    fake_evaluation(cfg, paths, BETTER, None, None, reference=WORSE)

    # An export step that damages the adapter on its way into the registry (what the check is for).
    honest = registry.model_folder

    def corrupting(policy_dir, dest, *args, **kwargs):
        folder = honest(policy_dir, dest, *args, **kwargs)
        _set_lora_b(folder, 1.5)
        return folder

    monkeypatch.setattr(registry, "model_folder", corrupting)
    with pytest.raises(registry.RegistryError, match=r"export-parity check failed, nothing registered: .* differs"):
        registry.run(cfg, paths)
    client = mlflow_store.registry_client(paths.root)
    assert client.search_model_versions(f"name='{NAME}'") == []
    failed = [r for r in client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id])]
    assert any(r.data.tags.get("export_parity", "").startswith("failed: ") for r in failed)
    monkeypatch.setattr(registry, "model_folder", honest)

    # The honest export registers, and the version says what the check measured.
    done = registry.run(cfg, paths)
    summary = client.get_model_version(NAME, done.version).tags["export_parity"]
    assert summary.startswith("pyfunc max |Δlog p| ") and "adapter effect" in summary

    # An adapter at its initialisation (LoRA B = 0) is the base model: refused, even if it scored well.
    untrained = tmp_path / "untrained"
    shutil.copytree(paths.policy_dir, untrained)
    _set_lora_b(untrained, None)
    shutil.rmtree(paths.policy_dir)
    shutil.copytree(untrained, paths.policy_dir)
    fake_evaluation(cfg, paths, BETTER, None, None, reference=WORSE)
    with pytest.raises(registry.RegistryError, match="does not change the base model"):
        registry.run(cfg, paths)
    assert [str(v.version) for v in client.search_model_versions(f"name='{NAME}'")] == [done.version]
