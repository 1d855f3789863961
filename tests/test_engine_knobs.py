"""The engine knobs TRL users expect (delta, top_entropy_quantile, entropy_coef, cispo, sapo, None
rewards): split over data-parallel ranks as one process, and a few real GRPO steps with each on.

Their numbers are checked against hand values in test_advantages_loss.py and against TRL's own code
in test_trl_parity.py; here they meet the trainer.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from pipelines import config
from pipelines.data import validate
from pipelines.grpo import distributed, trainer
from pipelines.grpo.loss import TOKEN_NORMALISED, grpo_loss
from pipelines.grpo.metrics import on_policy_knobs_warning
from pipelines.paths import Paths
from pipelines.verifiers import rewards
from tests.conftest import FakeRanks


@pytest.mark.parametrize(
    ("loss_type", "knobs"),
    [
        ("cispo", {"epsilon_high": 1.3}),
        ("sapo", {}),
        ("dapo", {"delta": 1.5}),
        ("grpo", {"delta": 1.5}),
        ("cispo", {"epsilon_high": 1.3, "top_entropy_quantile": 0.4}),
        ("sapo", {"top_entropy_quantile": 0.4}),
    ],
)
def test_rank_losses_sum_to_the_whole_batch_loss(loss_type, knobs):
    """Uneven slices (2 and 4 sequences): the shares of distributed.loss_share give the one-process loss
    and gradient for the new loss types (cispo normalises by tokens like dapo, sapo by sequences like
    grpo), and the entropy quantile is taken over the whole batch's tokens (`entropy_pool`)."""
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(6, 5, generator=g)).requires_grad_()
    old, ref = logp.detach() + 0.5 * torch.randn(6, 5, generator=g), logp.detach() - 0.1
    advantages = torch.randn(6, generator=g)
    entropy = torch.rand(6, 5, generator=g) * 3
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    ).float()
    kwargs = {"beta": 0.04, "loss_type": loss_type, "max_completion_length": 5, **knobs}

    whole, _ = grpo_loss(logp, old, advantages, mask, ref_logp=ref, entropy=entropy, **kwargs)
    (expected,) = torch.autograd.grad(whole, logp)

    parts = [slice(0, 2), slice(2, 6)]
    by_tokens = loss_type in TOKEN_NORMALISED
    counts = [float(mask[p].sum()) if by_tokens else float(mask[p].size(0)) for p in parts]
    pool = entropy[mask.bool()]  # what World.gather hands every rank
    summed = sum(
        grpo_loss(
            logp[p], old[p], advantages[p], mask[p], ref_logp=ref[p], entropy=entropy[p], entropy_pool=pool, **kwargs
        )[0]
        * distributed.loss_share(loss_type, mask[p], FakeRanks(sum(counts)))
        for p in parts
    )
    (got,) = torch.autograd.grad(summed, logp)
    assert float(summed.detach()) == pytest.approx(float(whole.detach()), abs=1e-6)
    assert torch.allclose(got, expected, atol=1e-7)


def _sometimes_none(prompts, completions, **_):
    """Scores a completion by its length, but leaves every third one unscored (None)."""
    return [None if i % 3 == 1 else float(len(c) % 5) for i, c in enumerate(completions)]


def _train(project, tiny_reference, overrides):
    cfg = config.load(project / "params.yaml", ["train.steps=2", "train.beta=0.0", *overrides], preset="smoke")
    paths = Paths(project)
    validate.run(cfg, paths)
    shutil.copytree(tiny_reference, paths.reference_dir)
    result = trainer.run(cfg, paths, log_to_mlflow=False)
    assert result.steps == 2
    return json.loads(paths.train_summary.read_text())


LENGTH = "train.rewards=[{name: length, weight: 1.0, params: {target_chars: 30}}]"


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.loss_type=grpo", "train.delta=1.5", "train.num_iterations=2"],
        ["train.top_entropy_quantile=0.2"],
        ["train.loss_type=cispo", "train.epsilon_high=5.0", "train.num_iterations=2"],
        ["train.loss_type=sapo", "train.importance_sampling_level=sequence", "train.beta=0.04"],
    ],
    ids=["delta", "top-entropy", "cispo", "sapo"],
)
def test_knob_trains_and_logs(project, tiny_reference, overrides):
    metrics = _train(project, tiny_reference, [LENGTH, *overrides])
    for key in ("loss", "reward", "entropy", "grad_norm"):
        assert math.isfinite(metrics[key]), key
    assert ("cispo_clip_ratio" in metrics) == ("train.loss_type=cispo" in overrides)
    if "cispo_clip_ratio" in metrics:
        assert 0 <= metrics["cispo_clip_ratio"] <= 1


def test_none_rewards_train(project, tiny_reference, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "sometimes_none", _sometimes_none)
    metrics = _train(
        project,
        tiny_reference,
        ["train.rewards=[{name: sometimes_none, weight: 1.0}]", "train.multi_objective_aggregation=normalize_then_sum"],
    )
    assert math.isfinite(metrics["reward"]) and math.isfinite(metrics["loss"])


def test_entropy_bonus_trains(project, tiny_reference):
    metrics = _train(project, tiny_reference, [LENGTH, "train.entropy_coef=0.01"])
    assert math.isfinite(metrics["policy_loss"]) and metrics["entropy_bonus"] > 0


@pytest.mark.parametrize(
    ("variant", "same_as"),
    [
        ({"loss_type": "grpo", "delta": 1.1}, {"loss_type": "grpo"}),
        ({"loss_type": "grpo", "epsilon_low": 0.01, "epsilon_high": 0.01}, {"loss_type": "grpo"}),
        ({"loss_type": "sapo"}, {"loss_type": "grpo"}),
        ({"loss_type": "cispo", "epsilon_high": 5.0}, {"loss_type": "dapo"}),
    ],
)
def test_ratio_knobs_do_not_act_on_policy(variant, same_as):
    """With num_iterations 1 the trainer's old log-probs are the new ones detached, so every ratio is
    exactly 1 and delta, the clip range, cispo's cap and sapo's gate all give the plain objective's
    gradient (cispo the token-normalised one, dapo). This is why bench/RESULTS.md only runs
    top_entropy_quantile and entropy_coef against the decline at the demo's settings."""
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])

    def grad(knobs: dict) -> torch.Tensor:
        logp = base.clone().requires_grad_(True)
        loss, _ = grpo_loss(logp, logp.detach(), advantages, mask, **knobs)
        loss.backward()
        return logp.grad

    torch.testing.assert_close(grad(variant), grad(same_as))
    # ...and off policy (a second pass over the same rollouts) they do differ:
    logp = (base + 0.5 * torch.randn(4, 6)).requires_grad_(True)
    loss_v, _ = grpo_loss(logp, base, advantages, mask, **variant)
    (g_v,) = torch.autograd.grad(loss_v, logp)
    loss_s, _ = grpo_loss(logp, base, advantages, mask, **same_as)
    (g_s,) = torch.autograd.grad(loss_s, logp)
    assert not torch.allclose(g_v, g_s)


@pytest.mark.parametrize(
    ("knobs", "said"),
    [
        ({"delta": 1.5}, "train.delta=1.5"),
        ({"loss_type": "cispo", "epsilon_high": 5.0}, "cispo (trains as dapo here)"),
        ({"loss_type": "sapo"}, "sapo (trains as grpo here)"),
        ({"loss_type": "sapo", "num_iterations": 2}, None),
        ({"loss_type": "dapo"}, None),
    ],
)
def test_on_policy_knobs_are_named_when_they_cannot_act(knobs, said):
    t = config.TrainConfig(**knobs)
    message = on_policy_knobs_warning(t)
    if said is None:
        assert message is None
    else:
        assert said in message and "train.num_iterations" in message
