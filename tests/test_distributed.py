"""Data-parallel training: 2 processes under torchrun make the update 1 process makes on the same batch."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines import config
from pipelines.config import ConfigError
from pipelines.grpo import distributed, trainer
from pipelines.grpo.loss import grpo_loss
from pipelines.paths import Paths
from tests.conftest import FakeRanks, cli_env, free_port, prepared_project

OVERRIDES = [
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.learning_rate=0.01",
    "train.prompts_per_step=4",
    # A reward that varies between completions of a random model, so the weights really move.
    "train.rewards=[{name: length, weight: 1.0, params: {target_chars: 30}}]",
]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_weighted_rank_losses_sum_to_the_whole_batch_loss(loss_type):
    """Uneven slices (2 and 4 sequences, different token counts): same loss and same gradient."""
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(6, 5, generator=g)).requires_grad_()
    old, ref = logp.detach() + 0.05 * torch.randn(6, 5, generator=g), logp.detach() - 0.1
    advantages = torch.randn(6, generator=g)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    ).float()
    kwargs = {"beta": 0.04, "loss_type": loss_type, "max_completion_length": 5}

    whole, _ = grpo_loss(logp, old, advantages, mask, ref_logp=ref, **kwargs)
    (expected,) = torch.autograd.grad(whole, logp)

    parts = [slice(0, 2), slice(2, 6)]
    counts = [float(mask[p].sum()) if loss_type in ("bnpo", "dapo") else float(mask[p].size(0)) for p in parts]
    summed = sum(
        grpo_loss(logp[p], old[p], advantages[p], mask[p], ref_logp=ref[p], **kwargs)[0]
        * distributed.loss_share(loss_type, mask[p], FakeRanks(sum(counts)))
        for p in parts
    )
    (got,) = torch.autograd.grad(summed, logp)
    assert float(summed.detach()) == pytest.approx(float(whole.detach()), abs=1e-6)
    assert torch.allclose(got, expected, atol=1e-7)


def test_refuses_what_data_parallelism_does_not_support():
    base = config.TrainConfig(prompts_per_step=4)
    distributed.check(base, 2)
    distributed.check(base.model_copy(update={"dynamic_sampling": True}), 2)
    with pytest.raises(ConfigError, match="at least 8"):
        distributed.check(base, 8)


def test_a_groups_completions_do_not_depend_on_its_batch(tiny_reference):
    """What makes N processes sample what one does: a seed per prompt, whatever else is in the batch."""
    from pipelines.generation.rollout import generate
    from pipelines.snapshot.loading import load_reference

    model, tokenizer = load_reference(tiny_reference)
    long = [{"role": "user", "content": "What is 12 * 13? Show your work, then the answer after ####."}]
    short = "What is 2 + 2?"
    kwargs = {"num_generations": 3, "max_new_tokens": 6, "do_sample": True, "backend": "lean"}
    both = generate(model, tokenizer, [long, short], seeds=[11, 22], **kwargs)
    alone = generate(model, tokenizer, [short], seeds=[22], **kwargs)
    assert torch.equal(both.completion_ids[3:], alone.completion_ids)  # other padding, same draws
    assert not torch.equal(
        both.completion_ids[3:], generate(model, tokenizer, [short], seeds=[23], **kwargs).completion_ids
    )
    assert len(set(map(tuple, alone.completion_ids.tolist()))) > 1  # the group's completions differ


def _assert_same_adapter(ddp: Path, single: Path) -> None:
    expected = load_file(str(Paths(single).policy_dir / "adapter_model.safetensors"))
    got = load_file(str(Paths(ddp).policy_dir / "adapter_model.safetensors"))
    assert set(got) == set(expected)
    assert sum(float((expected[k] != 0).float().sum()) for k in expected if "lora_B" in k) > 0, (
        "the adapter never moved"
    )
    # Summing gradients in two halves rounds differently from one sum, and Adam divides by the
    # gradients' own scale: 1.7e-5 apart at most on an AVX2-only CPU (below 1e-5 with AVX-512).
    # A wrong update would be off by ~lr (0.01) per step.
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-4), name


def test_two_processes_train_what_one_process_trains(tmp_path, tiny_reference):
    # grpo loss and batch-scaled rewards: both need the whole batch (sequence counts, reward std).
    overrides = [*OVERRIDES, "train.loss_type=grpo", "train.scale_rewards=batch"]
    single = tmp_path / "single"
    cfg = prepared_project(single, tiny_reference, overrides)
    trainer.run(cfg, Paths(single), log_to_mlflow=False)

    # `grpo train` with num_processes=2 starts itself under torchrun; MLflow on, to see rank 0 alone log.
    ddp = tmp_path / "ddp"
    prepared_project(ddp, tiny_reference, overrides)
    args = [sys.executable, "-m", "flows.cli", "train", "--preset", "smoke"]
    args += [a for o in [*overrides, "train.num_processes=2"] for a in ("-S", o)]
    done = subprocess.run(args, cwd=ddp, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout[done.stdout.index("{") :])["steps"] == 4

    _assert_same_adapter(ddp, single)

    # Same completions, same rewards, step by step; and one writer of everything.
    def curve(root):
        lines = Paths(root).train_plot.read_text().splitlines()
        column = lines[0].split(",").index("reward")
        return [float(line.split(",")[column]) for line in lines[1:]]

    assert curve(ddp) == pytest.approx(curve(single), abs=1e-6)
    assert json.loads((Paths(ddp).checkpoints_dir / "latest.json").read_text())["step"] == 4
    with sqlite3.connect(ddp / "mlflow.db") as db:
        assert db.execute("select count(*) from runs").fetchone() == (1,)


def _signal_for_addition_only(prompts, completions, id, **_):
    """Varies between completions of `add-*` rows only: about half the groups are flat."""
    return [float(len(c) % 5) if i.startswith("add") else 0.0 for c, i in zip(completions, id, strict=True)]


DYNAMIC = [
    "train.steps=6",
    "train.checkpoint_every=0",
    "train.learning_rate=0.01",
    "train.prompts_per_step=2",
    "train.rewards=[{name: addonly}]",
    "train.dynamic_sampling=true",
    "train.dynamic_sampling_oversample=1",  # rounds that fill one missing place draw one prompt
    "train.max_resample_rounds=6",
    "train.loss_type=grpo",
    "train.scale_rewards=batch",
    "train.beta=0.04",
]


def _rank(rank: int, root: str, port: int) -> None:
    """One of two processes, as torchrun would start it (spawned: the test's reward registered here)."""
    import os

    from pipelines.generation.rollout import Rollout
    from pipelines.verifiers import rewards

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rewards.REWARDS["addonly"] = _signal_for_addition_only
    # Leave a mark where this process had nothing: a round's slice, and a step's whole batch.
    empty, scored = Rollout.empty, trainer.token_logps

    def empty_slice(group_size):
        (Path(root) / f"empty-round-{rank}").touch()
        return empty(group_size)

    def token_logps(model, rollout, *args, **kwargs):
        if rollout.rows == 0:
            (Path(root) / f"empty-step-{rank}").touch()
        return scored(model, rollout, *args, **kwargs)

    Rollout.empty = staticmethod(empty_slice)
    trainer.token_logps = token_logps
    cfg = config.load(Path(root) / "params.yaml", [*DYNAMIC, "train.num_processes=2"], preset="smoke")
    trainer.run(cfg, Paths(Path(root)), log_to_mlflow=False)


def test_two_processes_with_dynamic_sampling_train_what_one_process_trains(tmp_path, tiny_reference, monkeypatch):
    """Resampled rounds draw fewer prompts than there are processes, and a process can keep no group
    of a step: it samples nothing, adds nothing to the gradient, and still joins every collective."""

    import pandas as pd
    import torch.multiprocessing as mp

    from pipelines.grpo import ledger
    from pipelines.verifiers import rewards

    monkeypatch.setitem(rewards.REWARDS, "addonly", _signal_for_addition_only)
    single = tmp_path / "single"
    cfg = prepared_project(single, tiny_reference, DYNAMIC)
    trainer.run(cfg, Paths(single), log_to_mlflow=False)

    ddp = tmp_path / "ddp"
    prepared_project(ddp, tiny_reference, DYNAMIC)
    port = free_port()
    mp.spawn(_rank, args=(str(ddp), port), nprocs=2, join=True)

    _assert_same_adapter(ddp, single)

    def history(root):
        return pd.read_csv(Paths(root).train_plot)

    one, two = history(single), history(ddp)
    assert (one["resample_rounds"] > 0).any(), "no step resampled: the test would pass trivially"
    for column in ("reward", "prompts_sampled", "frac_reward_zero_std", "loss", "kl"):
        assert two[column].tolist() == pytest.approx(one[column].tolist(), abs=1e-5), column
    assert list(ddp.glob("empty-round-*")), "no round drew fewer prompts than processes: the test is trivial"
    assert list(ddp.glob("empty-step-*")), "every process kept a group on every step: the test is trivial"
    # The ledger gathers every process's slice: it is the single process's, row for row.
    columns = ["step", "prompt_id", "group", "completion", "completion_ids", "text", "reward", "advantage", "truncated"]
    one_ledger, two_ledger = (ledger.read(ledger.ledger_dir(root))[columns] for root in (single, ddp))
    assert len(two_ledger) == len(one_ledger) > 0
    pd.testing.assert_frame_equal(two_ledger, one_ledger, atol=1e-5)
