"""`runtime.device`: where models run. The CPU side is checked here; the tests marked `gpu` run on a
machine with CUDA (`pytest -m gpu`, which bench/gpu_check.sh runs) and are skipped elsewhere."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from pipelines import config, device, precision
from pipelines.generation.rollout import Rollout
from pipelines.grpo import checkpoint, logprobs, policy, trainer
from pipelines.grpo.logprobs import token_logps
from pipelines.grpo.loss import grpo_loss

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve("auto") == torch.device("cpu")
    assert device.resolve("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(config.ConfigError, match="runtime.device=cuda, but torch sees no GPU.*runtime.device=auto"):
        device.resolve("cuda")


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device.resolve("auto") == torch.device("cuda", 3)
    assert device.resolve("cuda") == torch.device("cuda", 3)
    assert device.resolve("cpu") == torch.device("cpu")


def test_an_unknown_device_is_refused_at_config_load(project):
    with pytest.raises(config.ConfigError, match="runtime.device"):
        config.load(project / "params.yaml", ["runtime.device=tpu"])


def test_bf16_auto_asks_the_device_the_stages_run_on(monkeypatch, project):
    monkeypatch.setattr(precision, "native_bf16", lambda: False)  # a CPU without bf16 units...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # ...beside a GPU with them
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    on_gpu = config.load(project / "params.yaml")
    assert on_gpu.runtime.device == "auto" and on_gpu.train.bf16 is True and on_gpu.evaluate.bf16 is True
    on_cpu = config.load(project / "params.yaml", ["runtime.device=cpu"])
    assert on_cpu.train.bf16 is False and on_cpu.evaluate.bf16 is False
    asked = config.load(project / "params.yaml", ["train.bf16=false", "runtime.device=cuda"])
    assert asked.train.bf16 is False and asked.evaluate.bf16 is True  # an explicit value is kept


def test_a_checkpoint_resumes_whatever_precision_the_device_computes_in(project):
    cfg = config.load(project / "params.yaml", ["train.bf16=false"])
    key = trainer.fingerprint(cfg, "sha", b"data")
    moved = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"bf16": True, "gradient_checkpointing": True})}
    )
    assert trainer.fingerprint(moved, "sha", b"data") == key
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 0.5})})
    assert trainer.fingerprint(other, "sha", b"data") != key


def _rollout(vocab: int, group: int = 2, seed: int = 0) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (2, 6), generator=g).repeat_interleave(group, dim=0)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[group:, :2] = 0  # the second prompt is left-padded
    completion = torch.randint(3, vocab, (2 * group, 5), generator=g)
    mask = torch.ones_like(completion)
    mask[0, 3:] = 0
    return Rollout(prompt, prompt_mask, completion, mask, torch.zeros(2 * group, dtype=torch.bool), [""] * 4, group)


def _step(model, rollout: Rollout, where: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training pass (log-probs, loss, backward) of `model` on `where`: the loss and the trainable gradients."""
    model = model.to(where)
    model.zero_grad(set_to_none=True)
    model.train()
    logp, entropy = token_logps(model, rollout, with_entropy=True)
    mask = rollout.completion_mask.float().to(where)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], device=where)
    loss, _ = grpo_loss(logp, logp.detach(), advantages, mask, entropy=entropy)
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().cpu(), grads


def _policy(checkpointing: bool = False):
    """A tiny Llama with a LoRA adapter, built from a config (no tokenizer, no download: the GPU
    machine has neither), the adapter as policy.build makes it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the weights and LoRA A's initialisation draw from it
    shape = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128,
    )  # fmt: skip
    model = policy.add_lora(LlamaForCausalLM(shape), config.LoraConfig(r=4, alpha=8))
    policy.checkpointing(model, checkpointing)
    with torch.no_grad():  # a trained-looking adapter: B at zero would make every LoRA A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    plain = _policy()
    recomputed = _policy(checkpointing=True)
    plain.train(), recomputed.train()
    assert logprobs._checkpointing(recomputed) and not logprobs._checkpointing(plain)
    rollout = _rollout(plain.config.vocab_size)
    cpu = torch.device("cpu")
    loss_a, grads_a = _step(plain, rollout, cpu)
    loss_b, grads_b = _step(recomputed, rollout, cpu)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any(g.abs().sum() > 0 for g in grads_a.values())
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_rollout_moves_whole_and_stays_itself_where_it_is():
    rollout = _rollout(50)
    assert rollout.to(torch.device("cpu")) is rollout
    meta = rollout.to(torch.device("meta"))
    tensors = [meta.prompt_ids, meta.prompt_mask, meta.completion_ids, meta.completion_mask, meta.truncated]
    assert all(t.device.type == "meta" for t in tensors) and meta.texts == rollout.texts


def test_checkpoints_hold_cpu_tensors_and_load_onto_the_cpu(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    target = checkpoint.save(tmp_path, 1, model, optimizer, scheduler, {"fingerprint": "k"}, keep=2)
    monkeypatch.setattr(torch, "load", spy)
    checkpoint.load(target, torch.nn.Linear(3, 2), torch.optim.AdamW(torch.nn.Linear(3, 2).parameters()), scheduler)
    assert seen["map_location"] == "cpu" and seen["weights_only"] is True


# -- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "one-sequence"])
def test_a_training_pass_on_cuda_equals_the_cpu(grouped):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _policy()
    rollout = _rollout(model.config.vocab_size, group=2 if grouped else 1)
    loss_cpu, grads_cpu = _step(model, rollout, torch.device("cpu"))
    loss_gpu, grads_gpu = _step(model, rollout, torch.device("cuda"))
    torch.testing.assert_close(loss_gpu, loss_cpu, rtol=1e-4, atol=1e-6)
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@needs_cuda
def test_greedy_decoding_on_cuda_equals_the_cpu():
    from pipelines.generation.lean_decode import sample

    model = _policy().merge_and_unload().eval()
    rollout = _rollout(model.config.vocab_size)
    prompts, masks = rollout.prompt_ids[::2], rollout.prompt_mask[::2]
    kwargs = dict(num_generations=2, max_new_tokens=12, eos_id=0, pad_id=0, do_sample=False)
    on_cpu, _ = sample(model, prompts, masks, **kwargs)
    on_gpu, _ = sample(model.to("cuda"), prompts, masks, **kwargs)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), on_cpu)


@pytest.mark.gpu
@needs_cuda
def test_a_checkpoint_written_on_cuda_resumes_on_the_cpu(tmp_path):
    model = _policy().to("cuda")
    params = policy.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    _step(model, _rollout(model.config.vocab_size), torch.device("cuda"))
    optimizer.step()
    target = checkpoint.save(tmp_path / "ckpt", 1, model, optimizer, scheduler, {"fingerprint": "k"}, keep=2)
    on_cpu = _policy()
    cpu_optimizer = torch.optim.AdamW(policy.trainable_parameters(on_cpu), lr=1e-3)
    checkpoint.load(target, on_cpu, cpu_optimizer, torch.optim.lr_scheduler.LambdaLR(cpu_optimizer, lambda _: 1.0))
    trained = [p.detach().cpu() for p in params]
    for restored, want in zip(cpu_optimizer.param_groups[0]["params"], trained, strict=True):
        torch.testing.assert_close(restored.detach(), want)
    state = next(iter(cpu_optimizer.state.values()))
    assert state["exp_avg"].device.type == "cpu"


@pytest.mark.gpu
@needs_cuda
def test_peak_memory_is_reported_on_cuda():
    cuda = device.resolve("cuda")
    device.reset_peak_memory(cuda)
    block = torch.ones(1 << 20, device=cuda)
    metrics = device.peak_memory_metrics(cuda)
    assert metrics["gpu/peak_allocated_gib"] >= 4 / 1024 and block.numel()
    assert device.peak_memory_metrics(torch.device("cpu")) == {}


def test_the_kv_cache_goes_by_the_name_the_model_takes():
    from transformers import LlamaForCausalLM

    from pipelines.generation.lean_decode import cache_kwargs

    class Older(torch.nn.Module):  # transformers before the rename ignores `cache=` without a word
        def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...

    assert list(cache_kwargs(Older(), "kv")) == ["past_key_values"]
    expected = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
    assert list(cache_kwargs(_policy(), "kv")) == [expected]  # a peft model: its base model's name


def test_generate_decodes_into_a_static_cache_on_a_gpu_only():
    from pipelines.generation.backends import static_cache

    assert static_cache(SimpleNamespace(device=torch.device("cuda", 0))) == {"cache_implementation": "static"}
    assert static_cache(SimpleNamespace(device=torch.device("cpu"))) == {}


@pytest.mark.gpu
@needs_cuda
def test_the_hf_backend_on_cuda_compiles_and_decodes_as_the_cpu_does():
    from pipelines.generation.backends import SamplingRequest, get_backend

    model = _policy().merge_and_unload().eval()
    rollout = _rollout(model.config.vocab_size)
    prompts, masks = rollout.prompt_ids[::2], rollout.prompt_mask[::2]
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    request = SamplingRequest(num_generations=2, max_new_tokens=12, do_sample=False)
    on_cpu = get_backend("hf").completions(model, tokenizer, prompts, masks, request).ids
    on_gpu = get_backend("hf").completions(model.to("cuda"), tokenizer, prompts, masks, request).ids
    assert torch.equal(on_gpu.cpu(), on_cpu)
