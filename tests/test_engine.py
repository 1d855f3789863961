"""Engine pieces that can fail quietly elsewhere: reward time limits, dynamic sampling, aggregation."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from pipelines import config
from pipelines.config import ConfigError, RewardSpec
from pipelines.data import validate
from pipelines.grpo import policy
from pipelines.grpo.advantages import advantages_from_rewards
from pipelines.grpo.metrics import flat_groups_warning
from pipelines.grpo.prompt_sampler import PromptSampler
from pipelines.grpo.reward_runner import RewardError, score
from pipelines.grpo.trainer import sample_batch
from pipelines.io import read_jsonl
from pipelines.paths import Paths
from pipelines.verifiers import rewards

ROWS = [{"id": "a", "prompt": "p", "answer": "1"}, {"id": "b", "prompt": "q", "answer": "2"}]


def test_scores_are_per_function_with_nan_for_none(monkeypatch):
    monkeypatch.setitem(
        rewards.REWARDS,
        "half",
        lambda prompts, completions, **_: [None if i % 2 else 0.5 for i in range(len(completions))],
    )
    per_fn, means = score(
        [RewardSpec(name="accuracy"), RewardSpec(name="half")], ROWS, ["#### 1", "#### 3", "#### 2", "x"], 2, timeout=5
    )
    assert per_fn[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert per_fn[:, 1].isnan().tolist() == [False, True, False, True]
    assert means == {"rewards/accuracy/mean": 0.5, "rewards/half/mean": 0.5}


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda prompts, completions, **_: time.sleep(5), "did not finish within 0.2 s"),
        (lambda prompts, completions, **_: 1 / 0, "raised ZeroDivisionError"),
        (lambda prompts, completions, **_: [1.0], "returned 1 values for 4"),
        (lambda prompts, completions, **_: ["high"] * len(completions), "'high' (a str) for completion 0"),
    ],
)
def test_broken_verifiers_are_named_errors_not_zeros(monkeypatch, fn, message):
    monkeypatch.setitem(rewards.REWARDS, "broken", fn)
    with pytest.raises(RewardError, match="'broken'") as err:
        score([RewardSpec(name="broken")], ROWS, ["a", "b", "c", "d"], 2, timeout=0.2)
    assert message in str(err.value)


def test_timeout_works_off_the_main_thread(monkeypatch):
    import threading

    monkeypatch.setitem(rewards.REWARDS, "slow", lambda prompts, completions, **_: time.sleep(5))
    caught = []
    worker = threading.Thread(
        target=lambda: caught.append(
            pytest.raises(RewardError, score, [RewardSpec(name="slow")], ROWS, ["a"] * 4, 2, timeout=0.2)
        )
    )
    worker.start()
    worker.join(3)
    assert caught and not worker.is_alive()


def test_normalize_then_sum_by_hand():
    # Two functions, one group of 2: f1 = [1, 0] -> normalised [+.7071/(.7071+eps), -...]; f2 = [0, 0] -> [0, 0]
    per_fn = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    adv, rewards_, _ = advantages_from_rewards(per_fn, torch.tensor([1.0, 3.0]), 2, aggregation="normalize_then_sum")
    z = 0.5 / (0.70710678 + 1e-4)
    summed = torch.tensor([z, -z])
    assert rewards_.tolist() == [1.0, 0.0]
    assert adv.tolist() == pytest.approx(((summed - summed.mean()) / (summed.std() + 1e-4)).tolist(), abs=1e-5)
    # A large-scale function does not drown a small one: scaling f1 by 100 changes nothing.
    adv_big, _, _ = advantages_from_rewards(
        per_fn * torch.tensor([100.0, 1.0]), torch.tensor([1.0, 3.0]), 2, aggregation="normalize_then_sum"
    )
    assert torch.allclose(adv, adv_big, atol=1e-4)
    adv_sum, _, _ = advantages_from_rewards(per_fn * torch.tensor([100.0, 1.0]), torch.tensor([1.0, 3.0]), 2)
    # Summing first, f1 at scale 100 decides everything: rewards [100, 0] -> +-50 / 70.71.
    assert adv_sum.tolist() == pytest.approx([50 / 70.7107, -50 / 70.7107], abs=1e-3)


def _signal_only_for_addition(prompts, completions, id, **_):
    """Varies between completions for `add-*` rows only; multiplication rows are flat (no signal)."""
    return [float(len(c) % 7) if i.startswith("add") else 0.0 for c, i in zip(completions, id, strict=True)]


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_sampling_keeps_only_groups_with_signal(project, tiny_reference, monkeypatch, dynamic):
    monkeypatch.setitem(rewards.REWARDS, "addonly", _signal_only_for_addition)
    cfg = config.load(
        project / "params.yaml",
        [
            "train.rewards=[{name: addonly}]",
            "train.prompts_per_step=4",
            f"train.dynamic_sampling={str(dynamic).lower()}",
            "train.max_resample_rounds=8",
        ],
        preset="smoke",
    )
    paths = Paths(project)
    validate.run(cfg, paths)
    shutil.copytree(tiny_reference, paths.reference_dir)
    model, tokenizer, _ = policy.build(cfg, paths)
    rows = read_jsonl(paths.train_split)
    torch.manual_seed(0)
    batch = sample_batch(model, tokenizer, PromptSampler(rows, seed=3), cfg)
    G = cfg.train.num_generations
    assert batch.rollout.completion_ids.size(0) == len(batch.rows) * G == batch.per_function.size(0)
    stds = batch.per_function[:, 0].view(-1, G).std(dim=1)
    if dynamic:
        assert len(batch.rows) == 4 and all(r["id"].startswith("add") for r in batch.rows)
        assert (stds > 0).all()
        assert batch.frac_zero_std > 0 and batch.rounds >= 1
        assert batch.signal_groups == 4  # a full batch with signal: no flat-groups warning
    else:
        assert any(r["id"].startswith("mul") for r in batch.rows)  # flat groups stay in the batch
        assert (stds == 0).any()
        assert batch.signal_groups == int((stds > 0).sum())
    assert (flat_groups_warning(2, batch, cfg.train) is not None) == (not dynamic and batch.frac_zero_std >= 0.75)


def test_oversampled_rounds_fill_the_batch_in_fewer_rounds(project, tiny_reference, monkeypatch):
    """Drawing 3 prompts per missing one fills the batch sooner; the batch stays `prompts_per_step`."""
    monkeypatch.setitem(rewards.REWARDS, "addonly", _signal_only_for_addition)
    paths = Paths(project)
    batches = {}
    for factor in ("1", "3"):
        cfg = config.load(
            project / "params.yaml",
            [
                "train.rewards=[{name: addonly}]",
                "train.prompts_per_step=4",
                "train.dynamic_sampling=true",
                "train.max_resample_rounds=8",
                f"train.dynamic_sampling_oversample={factor}",
            ],
            preset="smoke",
        )
        if not paths.train_split.exists():
            validate.run(cfg, paths)
            shutil.copytree(tiny_reference, paths.reference_dir)
        model, tokenizer, _ = policy.build(cfg, paths)
        torch.manual_seed(0)
        batches[factor] = sample_batch(model, tokenizer, PromptSampler(read_jsonl(paths.train_split), seed=3), cfg)
    one, three = batches["1"], batches["3"]
    for batch in (one, three):
        assert len(batch.rows) == 4 and all(r["id"].startswith("add") for r in batch.rows)
        assert batch.rollout.completion_ids.size(0) == 4 * cfg.train.num_generations == batch.per_function.size(0)
    assert three.prompts_sampled >= 12 and three.rounds < one.rounds
    # The same prompt stream: the oversampled batch's groups are the first 4 with signal in it.
    assert [r["id"] for r in one.rows] == [r["id"] for r in three.rows]


def test_oversample_must_be_auto_or_at_least_one(project):
    with pytest.raises(ConfigError, match="dynamic_sampling_oversample"):
        config.load(project / "params.yaml", ["train.dynamic_sampling_oversample=0.5"], preset="smoke")


def test_sampling_copy_matches_the_policy(tiny_reference, smoke_cfg, project):
    """The merged sampling copy computes what the peft policy computes, and follows its updates."""
    from pipelines.generation.sampling_copy import SamplingCopy

    shutil.copytree(tiny_reference, Paths(project).reference_dir)
    model, _, _ = policy.build(smoke_cfg, Paths(project))
    ids = torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        for p in policy.trainable_parameters(model):  # move the adapter away from its zero init
            p.add_(torch.randn_like(p) * 0.05)
    copy = SamplingCopy(model, torch.float32)
    with torch.no_grad():
        assert torch.allclose(copy.model(ids).logits, model(ids).logits, atol=1e-5)
        for p in policy.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
        assert not torch.allclose(copy.model(ids).logits, model(ids).logits, atol=1e-5)
        copy.sync()
        assert torch.allclose(copy.model(ids).logits, model(ids).logits, atol=1e-5)
    assert not any(n for n, _ in copy.model.named_modules() if "lora" in n)


def test_lean_sampler_greedy_equals_transformers_generate(tiny_reference):
    """The lean loop (prefill once per prompt, shared KV cache) decodes what model.generate decodes."""
    from pipelines.generation.rollout import generate
    from pipelines.snapshot.loading import load_reference

    model, tokenizer = load_reference(tiny_reference)
    prompts = ["What is 2 + 2?", [{"role": "user", "content": "What is 12 * 3? Answer after ####."}]]
    ours = generate(model, tokenizer, prompts, num_generations=1, max_new_tokens=6, do_sample=False, backend="lean")
    theirs = generate(model, tokenizer, prompts, num_generations=1, max_new_tokens=6, do_sample=False, backend="hf")
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert ours.texts == theirs.texts


def test_filter_logits_top_p_keeps_the_smallest_nucleus():
    from pipelines.generation.lean_decode import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = ~filter_logits(logits, 1.0, 0, 0.8).isinf()
    assert kept.tolist() == [[True, True, False, False]]
    assert (~filter_logits(logits, 1.0, 3, 1.0).isinf()).sum() == 3


def test_shared_prompt_logps_equal_full_sequence_logps(tiny_reference, smoke_cfg, project):
    """Prefilling each prompt once per group gives the same log-probs and gradients as full rows."""
    from dataclasses import replace

    from pipelines.generation.rollout import generate
    from pipelines.grpo.logprobs import token_logps

    shutil.copytree(tiny_reference, Paths(project).reference_dir)
    model, tokenizer, _ = policy.build(smoke_cfg, Paths(project))
    with torch.no_grad():
        for p in policy.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    torch.manual_seed(0)
    prompts = ["What is 2 + 2?", [{"role": "user", "content": "A longer prompt: what is 12 * 3?"}]]
    rollout = generate(model, tokenizer, prompts, num_generations=3, max_new_tokens=6, do_sample=True)
    assert rollout.group_size == 3
    # Completions of different lengths (as if EOS came early), so length bucketing is exercised.
    lengths = torch.tensor([6, 2, 4, 1, 6, 3])
    rollout.completion_mask = (torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)).long()
    grouped, _ = token_logps(model, rollout)
    full, _ = token_logps(model, replace(rollout, group_size=1))
    mask = rollout.completion_mask.bool()
    assert torch.allclose(grouped[mask], full[mask], atol=1e-5)
    params = policy.trainable_parameters(model)
    g1 = torch.autograd.grad((grouped * mask).sum(), params, allow_unused=True)
    g2 = torch.autograd.grad((full * mask).sum(), params, allow_unused=True)
    for a, b in zip(g1, g2, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)


def test_training_pass_math_attention_matches_default_kernel(tiny_reference, smoke_cfg, project, monkeypatch):
    """The training pass's SDPA math kernel (chosen on the CPU for speed) gives the default kernel's numbers."""
    from contextlib import nullcontext

    from pipelines.generation.rollout import generate
    from pipelines.grpo import logprobs
    from pipelines.grpo.logprobs import token_logps

    shutil.copytree(tiny_reference, Paths(project).reference_dir)
    model, tokenizer, _ = policy.build(smoke_cfg, Paths(project))
    torch.manual_seed(0)
    rollout = generate(
        model, tokenizer, ["What is 2 + 2?", "What is 7 * 8?"], num_generations=3, max_new_tokens=6, do_sample=True
    )
    assert not isinstance(logprobs._attention_kernel(rollout.completion_ids), nullcontext)
    with torch.no_grad():
        assert isinstance(logprobs._attention_kernel(rollout.completion_ids), nullcontext)
    params = policy.trainable_parameters(model)
    mask = rollout.completion_mask.bool()
    math_logp, _ = token_logps(model, rollout)
    math_grads = torch.autograd.grad((math_logp * mask).sum(), params, allow_unused=True)
    monkeypatch.setattr(logprobs, "_attention_kernel", lambda like: nullcontext())
    flash_logp, _ = token_logps(model, rollout)
    flash_grads = torch.autograd.grad((flash_logp * mask).sum(), params, allow_unused=True)
    assert torch.allclose(math_logp[mask], flash_logp[mask], atol=1e-5)
    for a, b in zip(math_grads, flash_grads, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("backend", ["lean", "hf"])
def test_min_completion_length_holds_eos_back(tiny_reference, backend):
    """train.min_completion_length keeps EOS out of the first tokens (transformers' min_new_tokens), both backends."""
    from pipelines.generation.rollout import generate
    from pipelines.snapshot.loading import load_reference

    model, tokenizer = load_reference(tiny_reference)
    eos = tokenizer.eos_token_id

    def eos_first(_module, _inputs, logits):  # a model that wants to stop at once
        logits[..., eos] += 1e4
        return logits

    model.lm_head.register_forward_hook(eos_first)
    prompts = ["What is 2 + 2?", "What is 7 * 8?"]
    free = generate(
        model, tokenizer, prompts, num_generations=2, max_new_tokens=8, do_sample=True, backend=backend, seeds=[1, 2]
    )
    held = generate(
        model,
        tokenizer,
        prompts,
        num_generations=2,
        max_new_tokens=8,
        do_sample=True,
        backend=backend,
        seeds=[1, 2],
        min_new_tokens=5,
    )
    assert free.lengths.tolist() == [1, 1, 1, 1]
    assert held.lengths.tolist() == [6, 6, 6, 6]  # five tokens held back from EOS, then EOS
    assert not (held.completion_ids[:, :5] == eos).any() and (held.completion_ids[:, 5] == eos).all()


def test_exponential_race_samples_the_distribution_and_each_row_from_its_own_generator():
    from pipelines.generation.lean_decode import _exponential_noise, row_generators

    probs = torch.tensor([0.1, 0.0, 0.6, 0.25, 0.05]).repeat(4, 1)
    counts = torch.zeros(5)
    gens = row_generators([3], 4)
    for _ in range(5000):
        counts.index_add_(0, (probs / _exponential_noise(probs, torch.arange(4), gens)).argmax(-1), torch.ones(4))
    freq = counts / counts.sum()
    assert counts[1] == 0  # zero probability is never drawn
    assert torch.allclose(freq, probs[0], atol=0.01), freq.tolist()
    # a row's noise depends on its own generator only, not on which rows share the batch
    a, b = row_generators([7, 8], 2), row_generators([8], 2)
    for _ in range(3):
        assert torch.equal(
            _exponential_noise(probs, torch.arange(4), a)[2:], _exponential_noise(probs[:2], torch.arange(2), b)
        )


def test_truncation_warning_says_when_completions_start_running_to_the_limit():
    from types import SimpleNamespace

    from pipelines.grpo.trainer import truncation_warning

    t = SimpleNamespace(max_completion_length=48)
    clipped = [0.0, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 1.0, 1.0, 0.2]
    history = [{"step": i + 1, "completions/clipped_ratio": c, "entropy": 0.9} for i, c in enumerate(clipped)]
    said = [i + 1 for i in range(len(history)) if truncation_warning(history[: i + 1], t)]
    assert said == [3, 10]  # where it starts, then every 10 steps while it lasts; not when it stops
    message = truncation_warning(history[:3], t)
    assert "90% of completions" in message and "48 tokens" in message and "train.learning_rate" in message


def test_selective_rollouts_skip_prompts_that_were_flat():
    """A prompt flat at its last k visits is drawn with probability explore^k; one with signal always."""
    rows = [{"id": f"r{i}"} for i in range(10)]
    sampler = PromptSampler(rows, seed=0, explore=0.5)
    first = sampler.take(10)
    sampler.record(first, [int(r["id"][1:]) % 2 == 0 for r in first])  # even rows flat once
    drawn = sampler.take(2000)
    even = sum(int(r["id"][1:]) % 2 == 0 for r in drawn)
    # Per epoch 5 odd rows always, 5 even ones half the time: even / odd ~ 0.5.
    assert 0.4 < even / (len(drawn) - even) < 0.6
    assert sampler.skipped == pytest.approx(even, rel=0.15)  # as many skipped as drawn, at 0.5

    # A longer streak skips more often (0.5^3 = 1/8), capped so a fully flat dataset still ends.
    sampler = PromptSampler(rows, seed=0, explore=0.5)
    for _ in range(3):
        sampler.record(rows, [r["id"] != "r0" for r in rows])
    drawn = sampler.take(900)
    assert 0.42 < sum(r["id"] == "r0" for r in drawn) / len(drawn) < 0.53  # 1 : 9 x 1/8, so 8/17
    for _ in range(10):
        sampler.record(rows, [True] * 10)  # everything flat, streaks far past the cap
    assert len(sampler.take(50)) == 50  # still drawn, 1 in 16

    # Signal again resets the streak; off (explore 1) means the plain shuffle, draws and all.
    sampler.record([rows[1]], [False])
    assert sampler.flat_streak[1] == 0
    plain, off = PromptSampler(rows, seed=5), PromptSampler(rows, seed=5, explore=1.0)
    off.record(off.rows, [True] * 10)
    assert [r["id"] for r in plain.take(30)] == [r["id"] for r in off.take(30)] and off.skipped == 0


def test_selective_rollouts_state_resumes_the_same_draws():
    rows = [{"id": f"r{i}"} for i in range(7)]
    sampler = PromptSampler(rows, seed=1, explore=0.3)
    batch = sampler.take(5)
    sampler.record(batch, [True, False, True, True, False])
    sampler.take(3)
    state = json.loads(json.dumps(sampler.state_dict()))  # through JSON, as checkpoints store it
    restored = PromptSampler(rows, seed=99, explore=0.3)
    restored.load_state_dict(state)
    assert [r["id"] for r in restored.take(40)] == [r["id"] for r in sampler.take(40)]
    assert restored.skipped == sampler.skipped > 0


def test_selective_rollouts_in_training_spend_rollouts_on_prompts_with_signal(project, tiny_reference, monkeypatch):
    """Multiplication rows are flat under `addonly`: after one visit they are mostly skipped."""
    monkeypatch.setitem(rewards.REWARDS, "addonly", _signal_only_for_addition)
    paths = Paths(project)
    drawn = {}
    for on in (False, True):
        cfg = config.load(
            project / "params.yaml",
            [
                "train.rewards=[{name: addonly}]",
                "train.prompts_per_step=4",
                f"train.selective_rollouts={str(on).lower()}",
                "train.selective_rollouts_explore=0.1",
                "train.max_completion_length=4",
            ],
            preset="smoke",
        )
        if not paths.train_split.exists():
            validate.run(cfg, paths)
            shutil.copytree(tiny_reference, paths.reference_dir)
        model, tokenizer, _ = policy.build(cfg, paths)
        rows = read_jsonl(paths.train_split)
        explore = cfg.train.selective_rollouts_explore if on else 1.0
        sampler = PromptSampler(rows, seed=3, explore=explore)
        torch.manual_seed(0)
        batches = [sample_batch(model, tokenizer, sampler, cfg, step=s) for s in range(3 * len(rows) // 4)]
        # From the second epoch on: what share of the drawn prompts were multiplications (flat)?
        later = [r["id"] for b in batches[len(rows) // 4 + 1 :] for r in b.rows]
        drawn[on] = (sum(i.startswith("mul") for i in later) / len(later), sampler.skipped)
    share_mul = sum(r["id"].startswith("mul") for r in rows) / len(rows)
    assert drawn[False][1] == 0 and drawn[False][0] == pytest.approx(share_mul, abs=0.15)
    assert drawn[True][1] > 0 and drawn[True][0] < share_mul / 3


def test_selective_rollouts_explore_must_be_a_probability(project):
    for bad in ("0", "1", "1.5"):
        with pytest.raises(ConfigError, match="selective_rollouts_explore"):
            config.load(project / "params.yaml", [f"train.selective_rollouts_explore={bad}"], preset="smoke")
