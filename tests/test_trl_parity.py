"""Our loss and advantages against TRL's own code on identical random tensors, every combination.

The loss is TRL's real `GRPOTrainer._compute_loss` (and `get_high_entropy_mask`) called with a
stand-in `self`; the advantages are the block of TRL's `_generate_and_score_completions` that turns
per-function rewards into advantages, cut out of TRL's source and run on our rewards.
"""

from __future__ import annotations

import inspect
import itertools
import textwrap
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from pipelines.grpo.advantages import advantages_from_rewards
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

    def pad_across_processes(self, x, dim=0, pad_index=0):
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
    entropies=None,
    delta=None,
    top_entropy_quantile=1.0,
    entropy_coef=0.0,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
):
    """Call TRL's real `_compute_loss` with a stand-in `self` whose model returns our log-probs."""
    entropies = torch.zeros_like(logp) if entropies is None else entropies
    fake = SimpleNamespace(
        top_entropy_quantile=top_entropy_quantile,
        aux_loss_enabled=False,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        args=SimpleNamespace(
            delta=delta,
            use_bias_correction_kl=False,
            steps_per_generation=1,
            sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg,
        ),
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=_Accelerator(),
        max_completion_length=max_len,
        _entropy_bonus_enabled=entropy_coef != 0.0,
        entropy_coef=entropy_coef,
        use_adaptive_entropy=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropies, None),
    )
    fake.get_high_entropy_mask = lambda e, m, threshold: trl_grpo.GRPOTrainer.get_high_entropy_mask(
        fake, e, m, threshold
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
    # crc32, not hash(): str hashes change per process (PYTHONHASHSEED), and a seed must be the same in every run
    gen = torch.Generator().manual_seed(zlib.crc32(f"{loss_type}-{level}-{beta}".encode()))
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
    list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"], ["token_truncate", "sequence_mask"])),
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


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
LEVELS = ["token", "sequence"]  # TRL accepts every loss type at both levels (it only warns for some)


def _random_batch(seed, n=6, width=7):
    gen = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(n, width, generator=gen) * 3).requires_grad_()
    old_logp = logp.detach() + torch.randn(n, width, generator=gen) * 0.6  # ratios well outside every clip range
    ref_logp = logp.detach() + torch.randn(n, width, generator=gen) * 0.2
    advantages = torch.randn(n, generator=gen)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor([7, 3, 5, 1, 6, 4]).unsqueeze(1)).float()
    # Entropies with a gradient of their own (TRL's fused LM head differentiates them), from a leaf.
    entropy_logits = torch.randn(n, width, generator=gen).requires_grad_()
    return logp, old_logp, ref_logp, advantages, mask, entropy_logits


def _compare(seed, loss_type, level, beta=0.0, **knobs):
    """Our loss, its gradients (log-probs and entropies) and metrics against TRL's, with `knobs` on."""
    logp, old_logp, ref_logp, advantages, mask, entropy_logits = _random_batch(seed)
    entropies = torch.nn.functional.softplus(entropy_logits)
    eps_high = 1.3 if loss_type == "cispo" else 0.28  # cispo's eps_max caps the ratio itself
    n_items, max_len = float(mask.sum()), 9
    theirs, metrics = _trl_loss(
        logp,
        old_logp,
        ref_logp if beta else None,
        advantages,
        mask,
        loss_type=loss_type,
        level=level,
        beta=beta,
        eps_low=0.2,
        eps_high=eps_high,
        max_len=max_len,
        n_items=n_items,
        entropies=entropies,
        **knobs,
    )
    ours, stats = grpo_loss(
        logp,
        old_logp,
        advantages,
        mask,
        ref_logp=ref_logp if beta else None,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=eps_high,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=max_len,
        num_items_in_batch=n_items,
        entropy=entropies,
        **knobs,
    )
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5, abs=1e-7)
    grads_ours = torch.autograd.grad(
        ours, (logp, entropy_logits), allow_unused=True, materialize_grads=True, retain_graph=True
    )
    grads_theirs = torch.autograd.grad(theirs, (logp, entropy_logits), allow_unused=True, materialize_grads=True)
    for g_ours, g_theirs in zip(grads_ours, grads_theirs, strict=True):
        assert torch.allclose(g_ours, g_theirs, atol=1e-6)
    if loss_type == "cispo":
        assert stats.cispo_clip == pytest.approx(metrics["cispo_clip_ratio"][0], abs=1e-6)
        if level == "token":
            assert stats.cispo_clip > 0  # some weights really were capped
    elif loss_type == "sapo":
        assert "clip_ratio/region_mean" not in metrics and stats.clip_region == 0.0  # no hard clip to count
    else:
        assert stats.clip_low == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-6)
        assert stats.clip_high == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-6)
        assert stats.clip_region == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
    if beta:
        assert stats.kl == pytest.approx(metrics["kl"][0], rel=1e-5)
    if knobs.get("entropy_coef"):
        assert stats.policy_loss == pytest.approx(metrics["policy_loss"][0], rel=1e-5, abs=1e-7)
        assert grads_ours[1].abs().sum() > 0  # the bonus reached the entropies
    return ours, stats


@pytest.mark.parametrize(
    ("loss_type", "level", "beta"), list(itertools.product(["cispo", "sapo"], LEVELS, [0.0, 0.04]))
)
def test_cispo_and_sapo_match_trl(loss_type, level, beta):
    _compare(11, loss_type, level, beta)


@pytest.mark.parametrize("temperatures", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_temperatures_match_trl(temperatures):
    pos, neg = temperatures
    _compare(12, "sapo", "token", sapo_temperature_pos=pos, sapo_temperature_neg=neg)


@pytest.mark.parametrize(
    ("loss_type", "level"), list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"], LEVELS))
)
def test_two_sided_clipping_delta_matches_trl(loss_type, level):
    """delta caps the ratio of negative-advantage tokens (clipped types); cispo and sapo ignore it, as TRL."""
    with_delta, _ = _compare(13, loss_type, level, beta=0.04, delta=1.5)
    without, _ = _compare(13, loss_type, level, beta=0.04)
    if loss_type in ("cispo", "sapo"):
        assert float(with_delta) == float(without)
    elif level == "token":
        assert float(with_delta) != float(without)  # some negative-advantage ratio really was above delta


@pytest.mark.parametrize(
    ("loss_type", "level", "quantile", "coef"),
    [
        (loss_type, level, quantile, coef)
        for loss_type, level in itertools.product(LOSS_TYPES, LEVELS)
        for quantile, coef in [(0.4, 0.0), (1.0, 0.05), (0.25, 0.05)]
    ],
)
def test_entropy_mask_and_bonus_match_trl(loss_type, level, quantile, coef):
    _compare(14, loss_type, level, beta=0.04, top_entropy_quantile=quantile, entropy_coef=coef)


def _trl_advantages(per_function, weights, group_size, scale, aggregation):
    """TRL 1.16's rewards -> advantages, run from TRL's own source (it is inline in a long method)."""
    src = inspect.getsource(trl_grpo.GRPOTrainer._generate_and_score_completions)
    first = src.index("unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)")
    last = src.index("advantages = torch.nan_to_num(advantages, nan=0.0)")
    block = textwrap.dedent(src[src.rindex("\n", 0, first) + 1 : src.index("\n", last)])
    scope = dict(vars(trl_grpo))
    scope.update(
        self=SimpleNamespace(
            multi_objective_aggregation=aggregation,
            scale_rewards=scale,
            reward_weights=weights,
            reward_funcs=[None] * per_function.size(1),
        ),
        rewards_per_func=per_function.clone(),
        num_generations=group_size,
        device="cpu",
    )
    exec(compile(block, "trl-advantages", "exec"), scope)
    return scope["advantages"]


MEASURED = torch.tensor([[1.0, 1.0], [1.0, float("nan")], [0.0, 0.0], [float("nan"), float("nan")]])


@pytest.mark.parametrize(
    ("scale", "aggregation"),
    list(itertools.product(["group", "batch", "none"], ["sum_then_normalize", "normalize_then_sum"])),
)
def test_unscored_completions_match_trl(scale, aggregation):
    """None rewards (NaN): the measured group of the issue, then random batches with None scattered in,
    whole rows unscored and one group with nothing scored."""
    weights = torch.tensor([1.0, 1.0])
    ours, _, _ = advantages_from_rewards(MEASURED, weights, 4, scale, aggregation)
    assert ours.tolist() == pytest.approx(_trl_advantages(MEASURED, weights, 4, scale, aggregation).tolist(), abs=1e-6)
    if aggregation == "sum_then_normalize" and scale != "none":
        assert ours.tolist() == pytest.approx([1.0, 0.0, -1.0, 0.0], abs=1e-3)  # TRL's [1.00, 0.00, -1.00, 0.00]

    gen = torch.Generator().manual_seed(21)
    for G, n_fn in [(4, 2), (3, 3), (8, 1)]:
        per_fn = torch.randint(0, 3, (5 * G, n_fn), generator=gen).float()
        per_fn[torch.rand(per_fn.shape, generator=gen) < 0.3] = float("nan")
        per_fn[1] = float("nan")  # a completion no function scored
        per_fn[2 * G : 3 * G] = float("nan")  # a group with nothing scored
        weights = torch.rand(n_fn, generator=gen) + 0.5
        ours, _, _ = advantages_from_rewards(per_fn, weights, G, scale, aggregation)
        theirs = _trl_advantages(per_fn, weights, G, scale, aggregation)
        assert ours.tolist() == pytest.approx(theirs.tolist(), abs=1e-5), (G, n_fn)
        assert ours[1] == 0 and torch.all(ours[2 * G : 3 * G] == 0)
