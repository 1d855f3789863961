"""Our loss against TRL's own GRPOTrainer._compute_loss on identical random tensors, every combination."""

from __future__ import annotations

import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from pipelines.grpo.loss import grpo_loss

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="trl is a test-only extra: pip install -e '.[test]'")


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    loss_type,
    level,
    beta,
    eps_low,
    eps_high,
    max_len,
    n_items,
    is_ratio=None,
):
    """Call TRL's real `_compute_loss` with a stand-in `self` whose model returns our log-probs."""
    fake = SimpleNamespace(
        top_entropy_quantile=1.0,
        aux_loss_enabled=False,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=_Accelerator(),
        max_completion_length=max_len,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(logp.size(0), 2, dtype=torch.long),
        "prompt_mask": torch.ones(logp.size(0), 2),
        "completion_ids": torch.zeros_like(mask, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logp,
        "ref_per_token_logps": ref_logp,
        "num_items_in_batch": torch.tensor(float(n_items)),
    }
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize(
    ("loss_type", "level", "beta"),
    list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"], ["token", "sequence"], [0.0, 0.04])),
)
def test_loss_and_clip_metrics_match_trl(loss_type, level, beta):
    gen = torch.Generator().manual_seed(hash((loss_type, level, beta)) % 2**31)
    n, width, max_len = 6, 7, 9
    logp = (-torch.rand(n, width, generator=gen) * 3).requires_grad_()
    old_logp = logp.detach() + torch.randn(n, width, generator=gen) * 0.3  # off-policy: some ratios get clipped
    ref_logp = logp.detach() + torch.randn(n, width, generator=gen) * 0.2
    advantages = torch.randn(n, generator=gen)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()
    n_items = float(mask.sum())
    kw = dict(loss_type=loss_type, level=level, beta=beta, eps_low=0.2, eps_high=0.28, max_len=max_len, n_items=n_items)

    theirs, metrics = _trl_loss(logp, old_logp, ref_logp if beta else None, advantages, mask, **kw)
    ours, stats = grpo_loss(
        logp,
        old_logp,
        advantages,
        mask,
        ref_logp=ref_logp if beta else None,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=max_len,
        num_items_in_batch=n_items,
    )
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5, abs=1e-7)
    (grad_ours,) = torch.autograd.grad(ours, logp)
    (grad_theirs,) = torch.autograd.grad(theirs, logp)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-6)
    assert stats.clip_low == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-6)
    assert stats.clip_high == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-6)
    assert stats.clip_region == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
    if level == "token":
        assert stats.clip_region > 0  # the random ratios really exercised the clipping
    if beta:
        assert stats.kl == pytest.approx(metrics["kl"][0], rel=1e-5)


@pytest.mark.parametrize(
    ("loss_type", "mode"),
    list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"], ["token_truncate", "sequence_mask"])),
)
def test_sampler_correction_weights_the_loss_as_trl_does(loss_type, mode):
    """Our importance weights for a mismatched sampler, fed to TRL's loss as its `importance_sampling_ratio`,
    give the loss and gradients ours gives with them (TRL multiplies before adding the KL term, as we do)."""
    from pipelines.grpo.sampling_correction import importance_weights

    gen = torch.Generator().manual_seed(7)
    n, width = 6, 7
    logp = (-torch.rand(n, width, generator=gen) * 3).requires_grad_()
    sampler_logp = logp.detach() + torch.randn(n, width, generator=gen) * 0.4
    ref_logp = logp.detach() + torch.randn(n, width, generator=gen) * 0.2
    advantages = torch.randn(n, generator=gen)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor([7, 3, 5, 1, 6, 4]).unsqueeze(1)).float()
    weights, _ = importance_weights(logp, sampler_logp, mask, mode, clip_min=0.5, clip_max=2.0)
    assert weights is not None and not torch.all(weights == 1)
    kw = dict(
        loss_type=loss_type, level="token", beta=0.04, eps_low=0.2, eps_high=0.2, max_len=9, n_items=float(mask.sum())
    )
    theirs, _ = _trl_loss(logp, logp.detach(), ref_logp, advantages, mask, is_ratio=weights, **kw)
    ours, _ = grpo_loss(
        logp,
        logp.detach(),
        advantages,
        mask,
        ref_logp=ref_logp,
        beta=0.04,
        loss_type=loss_type,
        max_completion_length=9,
        num_items_in_batch=float(mask.sum()),
        is_weight=weights,
    )
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5, abs=1e-7)
    (grad_ours,) = torch.autograd.grad(ours, logp)
    (grad_theirs,) = torch.autograd.grad(theirs, logp)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-6)
