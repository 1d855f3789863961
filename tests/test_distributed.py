"""Data-parallel training: 2 processes under torchrun make the update 1 process makes on the same batch."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipelines import config
from pipelines.config import ConfigError
from pipelines.grpo import distributed, trainer
from pipelines.grpo.loss import grpo_loss
from pipelines.paths import Paths
from tests.conftest import cli_env, prepared_project

OVERRIDES = [
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.learning_rate=0.01",
    "train.prompts_per_step=4",
    # A reward that varies between completions of a random model, so the weights really move.
    "train.rewards=[{name: length, weight: 1.0, params: {target_chars: 30}}]",
]


class _Ranks:
    """Stands in for the process group in `loss_share`: `sum` returns the total over all ranks."""

    size = 2

    def __init__(self, total: float) -> None:
        self.total = total

    def sum(self, value: float) -> float:
        return self.total


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
        * distributed.loss_share(loss_type, mask[p], _Ranks(sum(counts)))
        for p in parts
    )
    (got,) = torch.autograd.grad(summed, logp)
    assert float(summed.detach()) == pytest.approx(float(whole.detach()), abs=1e-6)
    assert torch.allclose(got, expected, atol=1e-7)


def test_refuses_what_data_parallelism_does_not_support():
    base = config.TrainConfig(prompts_per_step=4)
    distributed.check(base, 2)
    with pytest.raises(ConfigError, match="train.dynamic_sampling=false"):
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


def test_two_processes_train_what_one_process_trains(tmp_path, tiny_reference):
    # grpo loss and batch-scaled rewards: both need the whole batch (sequence counts, reward std).
    overrides = [*OVERRIDES, "train.loss_type=grpo", "train.scale_rewards=batch"]
    single = tmp_path / "single"
    cfg = prepared_project(single, tiny_reference, overrides)
    trainer.run(cfg, Paths(single), log_to_mlflow=False)
    expected = load_file(str(Paths(single).policy_dir / "adapter_model.safetensors"))

    # `grpo train` with num_processes=2 starts itself under torchrun; MLflow on, to see rank 0 alone log.
    ddp = tmp_path / "ddp"
    prepared_project(ddp, tiny_reference, overrides)
    args = [sys.executable, "-m", "flows.cli", "train", "--preset", "smoke"]
    args += [a for o in [*overrides, "train.num_processes=2"] for a in ("-S", o)]
    done = subprocess.run(args, cwd=ddp, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout[done.stdout.index("{") :])["steps"] == 4

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

    # Same completions, same rewards, step by step; and one writer of everything.
    def curve(root):
        lines = Paths(root).train_plot.read_text().splitlines()
        column = lines[0].split(",").index("reward")
        return [float(line.split(",")[column]) for line in lines[1:]]

    assert curve(ddp) == pytest.approx(curve(single), abs=1e-6)
    assert json.loads((Paths(ddp).checkpoints_dir / "latest.json").read_text())["step"] == 4
    with sqlite3.connect(ddp / "mlflow.db") as db:
        assert db.execute("select count(*) from runs").fetchone() == (1,)
