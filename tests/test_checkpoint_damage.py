"""A checkpoint file cut short (a crash, a full disk) never wedges training: resume falls back to the
newest intact step and says so."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from pipelines.grpo import checkpoint


def _saved(tmp_path):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    for step in (10, 20):
        model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        checkpoint.save(tmp_path, step, model, optimizer, scheduler, {"fingerprint": "k"}, keep=2)
    return model, optimizer, scheduler


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt", "state.json", "files.json"])
def test_a_truncated_file_of_the_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, name):
    model, optimizer, scheduler = _saved(tmp_path)
    assert checkpoint.latest(tmp_path).name == "step-000020"
    damaged = tmp_path / "step-000020" / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        found = checkpoint.latest(tmp_path)
    assert found.name == "step-000010"
    assert "step-000020" in caplog.text and "resuming from step-000010" in caplog.text
    assert checkpoint.load(found, model, optimizer, scheduler)["step"] == 10  # it really loads


def test_a_damaged_latest_pointer_is_not_trusted(tmp_path, caplog):
    _saved(tmp_path)
    (tmp_path / "latest.json").write_text('{"step": 2')
    with caplog.at_level(logging.WARNING):
        assert checkpoint.latest(tmp_path).name == "step-000020"
    assert "latest.json is damaged" in caplog.text


def test_every_checkpoint_carries_its_hashes_and_none_left_means_a_fresh_start(tmp_path):
    _saved(tmp_path)
    manifest = json.loads((tmp_path / "step-000020" / "files.json").read_text())
    assert set(manifest) == {"trainable.safetensors", "optimizer.pt", "state.json"}
    for step in ("step-000010", "step-000020"):
        (tmp_path / step / "optimizer.pt").write_bytes(b"")
    assert checkpoint.latest(tmp_path) is None
