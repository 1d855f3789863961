"""The device check (issue 42.5): our training step on CUDA against the CPU, and our steps against TRL's.

Runs on the GPU machine through bench/gpu_check.sh (which installs the carried wheels first), and
here as a dry run at tiny sizes:

    .venv/bin/python bench/gpu_check.py --device cpu --dry-run      # -> bench/results/gpu-check/gpu_check.json

No weights and no tokenizer can reach that machine, so every model is built with random weights from
a config kept in bench/gpu_models/ (the real shapes of SmolLM2-135M, Qwen2.5-0.5B, Qwen2.5-1.5B) and
works on token ids. Sections, each guarded (an exception is recorded and the next section runs):
- `step`: one training step (log-probs, GRPO loss with KL to the adapter-off reference, backward) at
  SmolLM2-135M shapes in fp32 on a fixed batch: loss and LoRA gradients on the device against the CPU;
- `ours`: Qwen2.5-0.5B shapes, G = 8, 8 prompts, 256 completion tokens forced to the full length:
  lean sampling on the merged bf16 sampling copy, then log-probs, loss, backward and AdamW under bf16;
- `generate`: transformers' `generate` on the same copy and batch, the alternative decoder;
- `flops`: the training pass alone at Qwen2.5-1.5B shapes, FLOPs counted by torch's FlopCounterMode
  (as bench/train_flops.py counts them) over the GPU's bf16 dense peak;
- `trl`: TRL's GRPOTrainer (its defaults, transformers' generate) on the same work.
The JSON is rewritten after every section, so a run stopped by its time limit keeps what it measured.
The import path stays within the GPU image plus the carried wheels: no MLflow, Prefect, DVC or GX.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = REPO / "bench" / "gpu_models"
# Imported by nothing on this path; the image lacks them, so their presence would mean a dependency crept in.
FORBIDDEN = ("mlflow", "prefect", "dvc", "great_expectations")
# bf16 dense tensor-core peaks (NVIDIA's data sheets, without sparsity), matched in this order.
BF16_PEAKS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12))
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Sizes:
    """The work of each section; `shrink` overrides model config keys (the dry run's tiny models)."""

    prompts: int = 8
    group: int = 8
    prompt_tokens: int = 64
    completion_tokens: int = 256
    steps: int = 3  # timed steps, after one warm-up
    step_prompts: int = 2  # the CPU == device step: a small batch, since the CPU runs it too
    step_group: int = 4
    step_prompt_tokens: int = 32
    step_completion_tokens: int = 48
    shrink: tuple[tuple[str, int], ...] = ()


FULL = Sizes()
DRY = Sizes(
    prompts=2,
    group=2,
    prompt_tokens=8,
    completion_tokens=8,
    steps=1,
    step_prompts=2,
    step_group=2,
    step_prompt_tokens=8,
    step_completion_tokens=8,
    shrink=(
        ("num_hidden_layers", 2),
        ("hidden_size", 64),
        ("intermediate_size", 128),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("head_dim", 16),
    ),
)


# ---------------------------------------------------------------------------------------------
# Models, batches and timing
# ---------------------------------------------------------------------------------------------


def model_config(name: str, sizes: Sizes) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(MODELS / name)  # a local folder: nothing is downloaded
    for key, value in sizes.shrink:
        setattr(config, key, value)
    return config


def special_ids(config: Any) -> tuple[int, int]:
    """(eos, pad): the config's, pad falling back to BOS (<|endoftext|>, Qwen2.5 tokenizer's pad)."""
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else config.bos_token_id
    return int(eos), int(pad)


def build_model(config: Any, device: Any, seed: int, dtype: Any = None) -> Any:
    """Random weights from `config`, made on `device` (initialising 1.5B weights on a CPU takes long)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)


def lora(model: Any, bf16: bool) -> Any:
    """LoRA r=16 on every linear layer, as the project's default; with bf16 the frozen weights under
    each adapter are stored in bf16 and the adapter stays fp32, as policy.build does."""
    import torch
    from peft.tuners.lora import LoraLayer

    from pipelines.config import LoraConfig
    from pipelines.grpo.policy import add_lora

    model = add_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))
    if bf16:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.get_base_layer().to(torch.bfloat16)
    return model


def token_ids(rows: int, width: int, config: Any, generator: Any) -> Any:
    """Random ids clear of both ends of the vocabulary, where the special tokens of these models live."""
    import torch

    return torch.randint(32, config.vocab_size - 512, (rows, width), generator=generator)


def rollout_of(prompt_ids: Any, prompt_mask: Any, completion_ids: Any, completion_mask: Any, group: int) -> Any:
    """A Rollout of `group` completions per prompt (prompt rows repeated), as the trainer builds one."""
    import torch

    from pipelines.generation.rollout import Rollout

    rows = completion_ids.size(0)
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(group, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(group, dim=0),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        truncated=torch.ones(rows, dtype=torch.bool),
        texts=[""] * rows,
        group_size=group,
    )


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> tuple[float, Any]:
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - started, out


def fresh_memory(device: Any) -> None:
    """Free what the last section left and restart the peak, so each engine's peak is its own."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def autocast(device: Any, enabled: bool) -> Any:
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# ---------------------------------------------------------------------------------------------
# step: one training step on the device equals the same step on the CPU
# ---------------------------------------------------------------------------------------------


@dataclass
class StepBatch:
    rollout: Any
    advantages: Any
    old_logp: Any


def step_batch(config: Any, sizes: Sizes, seed: int) -> StepBatch:
    """Left-padded prompts of several lengths, completions of several lengths ending in EOS, fixed advantages."""
    import torch

    g = torch.Generator().manual_seed(seed)
    eos, pad = special_ids(config)
    P, G, Lp, C = sizes.step_prompts, sizes.step_group, sizes.step_prompt_tokens, sizes.step_completion_tokens
    prompt_ids = token_ids(P, Lp, config, g)
    prompt_mask = torch.ones(P, Lp, dtype=torch.long)
    for row in range(P):
        short = int(torch.randint(0, Lp // 2, (1,), generator=g))
        prompt_ids[row, :short], prompt_mask[row, :short] = pad, 0
    completion_ids = token_ids(P * G, C, config, g)
    lengths = torch.randint(1, C + 1, (P * G,), generator=g)
    lengths[0] = C  # one row runs to the limit without EOS
    positions = torch.arange(C)[None, :]
    completion_mask = (positions < lengths[:, None]).long()
    completion_ids[positions == (lengths[:, None] - 1)] = eos
    completion_ids[0, -1] = int(token_ids(1, 1, config, g))
    completion_ids[completion_mask == 0] = pad
    rollout = rollout_of(prompt_ids, prompt_mask, completion_ids, completion_mask, G)
    rollout.truncated = lengths == C
    advantages = torch.randn(P * G, generator=g)
    # The sampler's log-probs: near the model's (log 1/vocabulary for random weights) but not equal,
    # so that the ratio, and so the loss, depends on the model; fixed, so both devices see the same.
    old_logp = -torch.log(torch.tensor(float(config.vocab_size))) + 0.05 * torch.randn(P * G, C, generator=g)
    return StepBatch(rollout, advantages, old_logp)


def randomise_adapters(model: Any, seed: int) -> None:
    """peft starts every LoRA B at zero, where A's gradient is zero too: give B small random values."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def one_step(model: Any, batch: StepBatch) -> dict[str, Any]:
    """Loss and LoRA gradients of one step, on the CPU for comparison. Tensors go in as they come:
    token_logps moves the rollout to the model's device, and the loss runs where log-probs are."""
    import torch

    from pipelines.grpo.logprobs import token_logps
    from pipelines.grpo.loss import grpo_loss
    from pipelines.grpo.policy import reference_view

    model.train()
    model.zero_grad(set_to_none=True)
    logp, _ = token_logps(model, batch.rollout, bf16=False, with_entropy=True)
    reference, adapter_off = reference_view(model, None)
    with torch.no_grad(), adapter_off:
        ref_logp, _ = token_logps(reference, batch.rollout, bf16=False)
    where = logp.device
    loss, _ = grpo_loss(
        logp,
        batch.old_logp.to(where),
        batch.advantages.to(where),
        batch.rollout.completion_mask.to(where),
        ref_logp=ref_logp.to(where),
        beta=0.04,
    )
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": float(loss.detach()), "logp": logp.detach().float().cpu(), "grads": grads}


def plain_logps(model: Any, rollout: Any) -> Any:
    """Completion log-probs from one plain forward over prompt + completion, on the CPU.

    token_logps shares each prompt's KV cache with its group: if the installed transformers ignored
    the cache (a renamed keyword), the completions would be scored without their prompt, the same
    way on every device, and the CPU == device comparison alone would not see it."""
    import torch

    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits.float()
    width = rollout.completion_ids.size(1)
    logp = logits[:, -width - 1 : -1].log_softmax(-1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    return logp * rollout.completion_mask


def relative_difference(a: Any, b: Any) -> float:
    """max |a - b| / max |a|: relative to the tensor's scale, so near-zero entries do not blow it up."""
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def section_step(device: Any, sizes: Sizes, seed: int) -> dict[str, Any]:
    import torch

    # fp32 means fp32: TF32 matmuls (10-bit mantissa) alone would miss 1e-4.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = model_config("smollm2-135m", sizes)
    cpu_model = lora(build_model(config, torch.device("cpu"), seed), bf16=False)
    randomise_adapters(cpu_model, seed)
    device_model = copy.deepcopy(cpu_model).to(device)
    batch = step_batch(config, sizes, seed)
    on_cpu, on_device = one_step(cpu_model, batch), one_step(device_model, batch)
    grads = {n: relative_difference(g, on_device["grads"][n]) for n, g in on_cpu["grads"].items()}
    worst = max(grads, key=grads.__getitem__)
    loss_diff = abs(on_cpu["loss"] - on_device["loss"]) / max(abs(on_cpu["loss"]), 1e-30)
    mask = batch.rollout.completion_mask
    plain = float((plain_logps(cpu_model, batch.rollout) - on_cpu["logp"] * mask).abs().max())
    result = {
        "model": "smollm2-135m",
        "rows": batch.rollout.rows,
        "completion_tokens": int(batch.rollout.completion_mask.sum()),
        "lora_tensors": len(grads),
        "loss_cpu": on_cpu["loss"],
        "loss_device": on_device["loss"],
        "loss_relative_difference": loss_diff,
        "logp_max_abs_difference": float((on_cpu["logp"] - on_device["logp"]).abs().max()),
        "grad_max_relative_difference": grads[worst],
        "grad_worst_tensor": worst,
        "logp_vs_plain_forward_max_abs_difference": plain,
        "tolerance": TOLERANCE,
    }
    checks = {
        "loss: device vs CPU": loss_diff,
        "LoRA gradients: device vs CPU": grads[worst],
        "log-probs: token_logps vs one plain forward (a transformers that ignores `cache=`?)": plain,
    }
    result["failures"] = [f"{name}: {value:.3g} > {TOLERANCE}" for name, value in checks.items() if value > TOLERANCE]
    result["passed"] = not result["failures"]
    return result


# ---------------------------------------------------------------------------------------------
# ours: sampling on the merged copy + the training pass, at Qwen2.5-0.5B shapes
# ---------------------------------------------------------------------------------------------


def prompt_batch(config: Any, sizes: Sizes, seed: int) -> tuple[Any, Any]:
    """Equal-length prompts (no padding), the same for every engine; on the CPU, as rollouts are kept."""
    import torch

    ids = token_ids(sizes.prompts, sizes.prompt_tokens, config, torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def train_pass(model: Any, rollout: Any, advantages: Any, optimizer: Any, params: list[Any], bf16: bool) -> None:
    """What the trainer does with a batch: log-probs and entropies, the loss, backward, clipping, AdamW."""
    import torch

    from pipelines.grpo.logprobs import token_logps
    from pipelines.grpo.loss import grpo_loss

    model.train()
    with autocast(next(iter(params)).device, bf16):
        logp, _ = token_logps(model, rollout, bf16=bf16, with_entropy=True)
    mask = rollout.completion_mask.to(logp.device)
    loss, _ = grpo_loss(logp, logp.detach(), advantages.to(logp.device), mask)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def lean_sample(sampler: Any, prompts: Any, mask: Any, config: Any, sizes: Sizes, seeds: list[int] | None) -> Any:
    """Completion ids (on the CPU) from the lean decode loop, EOS held back to the full length.
    With `seeds`, one generator per completion as training rollouts draw them; else torch's own."""
    import torch

    from pipelines.generation.lean_decode import row_generators, sample

    eos, pad = special_ids(config)
    where = next(sampler.model.parameters()).device
    with torch.no_grad():
        ids, _ = sample(
            sampler.model,
            prompts.to(where),
            mask.to(where),
            num_generations=sizes.group,
            max_new_tokens=sizes.completion_tokens,
            min_new_tokens=sizes.completion_tokens,
            eos_id=eos,
            pad_id=pad,
            generators=None if seeds is None else row_generators(seeds, sizes.group),
        )
    return ids.cpu()


def policy_and_copy(name: str, device: Any, sizes: Sizes, seed: int) -> tuple[Any, Any, Any, bool]:
    """(config, LoRA policy, its merged sampling copy, bf16): bf16 on CUDA, fp32 on the CPU (whose
    bf16 matmuls are slow without AVX-512 BF16, pipelines/precision.py)."""
    import torch

    from pipelines.generation.sampling_copy import SamplingCopy

    bf16 = device.type == "cuda"
    config = model_config(name, sizes)
    model = lora(build_model(config, device, seed), bf16)
    return config, model, SamplingCopy(model, torch.bfloat16 if bf16 else torch.float32), bf16


def section_ours(device: Any, sizes: Sizes, seed: int) -> dict[str, Any]:
    import torch

    from pipelines.grpo.policy import trainable_parameters

    fresh_memory(device)
    config, model, sampler, bf16 = policy_and_copy("qwen2.5-0.5b", device, sizes, seed)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    prompts, mask = prompt_batch(config, sizes, seed)
    advantages = torch.randn(sizes.prompts * sizes.group, generator=torch.Generator().manual_seed(seed))
    steps = []
    for step in range(1 + sizes.steps):
        seeds = [step * sizes.prompts + i for i in range(sizes.prompts)]
        sample_s, ids = timed(lambda s=seeds: lean_sample(sampler, prompts, mask, config, sizes, s), device)
        rollout = rollout_of(prompts, mask, ids, torch.ones_like(ids), sizes.group)
        train_s, _ = timed(lambda r=rollout: train_pass(model, r, advantages, optimizer, params, bf16), device)
        sync_s, _ = timed(sampler.sync, device)
        steps.append({"sample_s": sample_s, "train_s": train_s, "sync_s": sync_s, "tokens": int(ids.numel())})
    return engine_summary("qwen2.5-0.5b", steps, device, bf16=bf16, decoder="lean_decode.sample, seeded rows")


def engine_summary(model: str, steps: list[dict[str, Any]], device: Any, **extra: Any) -> dict[str, Any]:
    """Medians over the steps after the first (a warm-up: allocator, kernels, caches)."""
    timed_steps = steps[1:] or steps
    for s in steps:
        s["step_s"] = s.get("step_s", sum(v for k, v in s.items() if k.endswith("_s")))
    median = {k: statistics.median(s[k] for s in timed_steps) for k in timed_steps[0] if k.endswith("_s")}
    tokens = statistics.median(s["tokens"] for s in timed_steps)
    return {
        "model": model,
        **extra,
        **median,
        "completion_tokens_per_step": tokens,
        "tokens_per_s": tokens / median["step_s"],
        "peak_memory_gib": peak_memory_gib(device),
        "steps": steps,
    }


# ---------------------------------------------------------------------------------------------
# generate: the decoders on the same batch (lean unseeded, transformers' generate)
# ---------------------------------------------------------------------------------------------


def section_generate(device: Any, sizes: Sizes, seed: int) -> dict[str, Any]:
    fresh_memory(device)
    config, _, sampler, _ = policy_and_copy("qwen2.5-0.5b", device, sizes, seed)
    prompts, mask = prompt_batch(config, sizes, seed)
    eos, pad = special_ids(config)
    where = next(sampler.model.parameters()).device

    def hf_generate() -> Any:
        import torch

        with torch.no_grad():
            return sampler.model.generate(
                input_ids=prompts.to(where),
                attention_mask=mask.to(where),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=sizes.completion_tokens,
                min_new_tokens=sizes.completion_tokens,
                num_return_sequences=sizes.group,
                eos_token_id=eos,
                pad_token_id=pad,
            )

    result: dict[str, Any] = {"model": "qwen2.5-0.5b", "failures": []}
    decoders = {
        "hf_generate": hf_generate,
        "lean_unseeded": lambda: lean_sample(sampler, prompts, mask, config, sizes, None),
    }
    tokens = sizes.prompts * sizes.group * sizes.completion_tokens
    for name, fn in decoders.items():
        try:  # one decoder failing keeps the other's numbers
            times = [timed(fn, device)[0] for _ in range(1 + sizes.steps)]
        except Exception as exc:
            result[name] = error_record(exc)
            result["failures"].append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        seconds = statistics.median(times[1:] or times)
        result[name] = {"seconds": seconds, "times": times, "tokens_per_s": tokens / seconds}
    result["peak_memory_gib"] = peak_memory_gib(device)
    result["passed"] = not result["failures"]
    return result


# ---------------------------------------------------------------------------------------------
# flops: the training pass's share of the GPU's bf16 peak, at Qwen2.5-1.5B shapes
# ---------------------------------------------------------------------------------------------


def bf16_peak(device: Any) -> tuple[str, float | None]:
    import torch

    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in BF16_PEAKS if key in name), None)


def matmul_peak(device: Any, n: int = 8192, repeats: int = 10) -> float | None:
    """bf16 FLOP/s of n x n x n matmuls on this GPU (mean after a warm-up): what its tensor cores
    reach on the easiest work, beside the data sheet's peak (None on the CPU)."""
    import torch

    if device.type != "cuda":
        return None
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    seconds, _ = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * n**3 * repeats / seconds


def section_flops(device: Any, sizes: Sizes, seed: int) -> dict[str, Any]:
    import torch

    # Half the prompts if the full batch does not fit: the share of peak needs a full GPU, not a given batch.
    attempts = [sizes.prompts, max(1, sizes.prompts // 2)]
    for prompts in attempts:
        try:
            return flops_pass(device, replace(sizes, prompts=prompts), seed)
        except torch.cuda.OutOfMemoryError:
            if prompts == attempts[-1]:
                raise
    raise AssertionError("unreachable")


def flops_pass(device: Any, sizes: Sizes, seed: int) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.grpo.policy import trainable_parameters

    fresh_memory(device)
    bf16 = device.type == "cuda"
    config = model_config("qwen2.5-1.5b", sizes)
    model = lora(build_model(config, device, seed), bf16)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    g = torch.Generator().manual_seed(seed)
    prompts = token_ids(sizes.prompts, sizes.prompt_tokens, config, g)
    # Sampled or not, the pass costs the same: random completions at the full length.
    completions = token_ids(sizes.prompts * sizes.group, sizes.completion_tokens, config, g)
    rollout = rollout_of(prompts, torch.ones_like(prompts), completions, torch.ones_like(completions), sizes.group)
    advantages = torch.randn(completions.size(0), generator=g)
    run = lambda: train_pass(model, rollout, advantages, optimizer, params, bf16)  # noqa: E731
    timed(run, device)  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    times = [timed(run, device)[0] for _ in range(max(sizes.steps, 3))]
    seconds = statistics.median(times)
    flops = counter.get_total_flops()
    name, peak = bf16_peak(device)
    measured = matmul_peak(device)
    tokens = int(rollout.completion_mask.numel() + prompts.numel())
    model_flops = six_nd(config, sum(p.numel() for p in model.parameters()), sizes)
    return {
        "model": "qwen2.5-1.5b",
        "prompts": sizes.prompts,
        "completions": int(completions.size(0)),
        "tokens_through_model": tokens,
        "train_pass_s": seconds,
        "train_pass_times": times,
        "flops_counted": flops,
        "flop_per_s": flops / seconds,
        "device_name": name,
        "bf16_dense_peak_flop_per_s": peak,
        "share_of_peak": flops / seconds / peak if peak else None,
        "measured_bf16_matmul_flop_per_s": measured,
        "share_of_measured_matmul": flops / seconds / measured if measured else None,
        "flops_6nd": model_flops,
        "share_of_peak_6nd": model_flops / seconds / peak if peak else None,
        "peak_memory_gib": peak_memory_gib(device),
    }


def six_nd(config: Any, n_params: int, sizes: Sizes) -> float:
    """The usual model-FLOPs figure: 6 x parameters x tokens, plus attention (12 x layers x width x
    the keys each token attends to), prompts once per group as the pass runs them. It counts weight
    gradients that LoRA never computes for the frozen weights, so it runs above the counted FLOPs."""
    P, G, Lp, T = sizes.prompts, sizes.group, sizes.prompt_tokens, sizes.completion_tokens
    tokens = P * Lp + P * G * T
    keys = P * Lp * (Lp + 1) / 2 + P * G * (T * Lp + T * (T + 1) / 2)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    return 6 * n_params * tokens + 12 * config.num_hidden_layers * width * keys


# ---------------------------------------------------------------------------------------------
# trl: GRPOTrainer with its defaults (transformers' generate) on the same work
# ---------------------------------------------------------------------------------------------


def word_tokenizer(config: Any) -> Any:
    """A tokenizer made in code, since none can travel: word-level, token i is the word `t{i}`, so a
    prompt of ids is the text "t5 t17 ..." and TRL's tokenisation gives back exactly those ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos, pad = special_ids(config)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config.vocab_size)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words,
        eos_token=f"t{eos}",
        pad_token=f"t{pad}",
        bos_token=f"t{config.bos_token_id}",
        unk_token="t0",
        padding_side="left",
    )


def trl_args(out: str, device: Any, sizes: Sizes, seed: int) -> Any:
    """TRL's defaults (no vLLM: transformers' generate; bf16 on a GPU; gradient checkpointing on), on our work."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=sizes.prompts * sizes.group,  # one generation batch = one step
        num_generations=sizes.group,
        max_completion_length=sizes.completion_tokens,
        generation_kwargs={"min_new_tokens": sizes.completion_tokens},  # as bench_vs_trl.py --min-tokens
        max_steps=1 + sizes.steps,
        learning_rate=2e-4,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        seed=seed,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )


def section_trl(device: Any, sizes: Sizes, seed: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    fresh_memory(device)
    bf16 = device.type == "cuda"
    config = model_config("qwen2.5-0.5b", sizes)
    tokenizer = word_tokenizer(config)
    steps = 1 + sizes.steps
    prompts, _ = prompt_batch(config, replace(sizes, prompts=sizes.prompts * steps), seed)
    texts = [" ".join(f"t{i}" for i in row.tolist()) for row in prompts]
    if tokenizer(texts[0])["input_ids"] != prompts[0].tolist():
        raise AssertionError("the word-level tokenizer does not give back the prompt's ids")
    # What TRL's dtype="auto" loads for these configs (torch_dtype bfloat16); its LoRA is kept fp32 by peft.
    model = build_model(config, device, seed, dtype=torch.bfloat16 if bf16 else torch.float32)
    clock: list[float] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            sync(device)
            clock.append(time.perf_counter() - self.started)

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    def digits(completions: list[str], **kwargs: Any) -> list[float]:
        # Any cheap reward that differs within a group, so that advantages, and the update, are not zero.
        return [float(sum(map(len, c.split())) % 7) for c in completions]

    with tempfile.TemporaryDirectory(prefix="gpu-check-trl-") as out:
        args = trl_args(out, device, sizes, seed)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[digits],
            args=args,
            train_dataset=Dataset.from_list([{"prompt": t} for t in texts]),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
            callbacks=[Clock()],
        )
        trainer.remove_callback(PrinterCallback)  # its log lines would bury the check's own
        trainer.train()
    # Tokens from TRL's own log of completion lengths (the full length, when EOS was held back).
    per_step = sizes.prompts * sizes.group
    full = per_step * sizes.completion_tokens
    step_rows = [
        {"step_s": s, "tokens": round(lengths[i] * per_step) if i < len(lengths) else full} for i, s in enumerate(clock)
    ]
    settings = {
        "gradient_checkpointing": args.gradient_checkpointing,
        "bf16": args.bf16,
        "loss_type": args.loss_type,
        "beta": args.beta,
        "model_dtype": str(model.dtype),
        "tokenizer": "word-level PreTrainedTokenizerFast built in code: word t{i} is token id i",
        "trl": _version("trl"),
    }
    return engine_summary("qwen2.5-0.5b", step_rows, device, settings=settings, mean_lengths=lengths)


# ---------------------------------------------------------------------------------------------
# The run: sections guarded one by one, the JSON rewritten after each
# ---------------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[Any, Sizes, int], dict[str, Any]]] = {
    "step": section_step,
    "ours": section_ours,
    "generate": section_generate,
    "flops": section_flops,
    "trl": section_trl,
}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment(device: Any) -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": bf16_peak(device)[0],
        "cpu_count": os.cpu_count(),
        **{name: _version(name) for name in ("transformers", "peft", "accelerate", "trl", "datasets", "pydantic")},
    }


def run_section(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], path: Path) -> None:
    started = time.perf_counter()
    entry: dict[str, Any] = {"ran": True}
    try:
        result = fn()
        entry.update(ok=result.get("passed", True) is not False, result=result)
    except Exception as exc:  # recorded, and the next section still runs
        entry.update(ok=False, error=error_record(exc))
    entry["seconds"] = time.perf_counter() - started
    entry["forbidden_modules_loaded"] = [m for m in FORBIDDEN if m in sys.modules]
    report["sections"][name] = entry
    report["targets"] = targets(report["sections"])
    write_json(path, report)
    why = entry["error"]["message"] if "error" in entry else "; ".join(entry["result"].get("failures", []))
    state = "ok" if entry["ok"] else f"FAILED: {why[:300]}"
    print(f"[gpu_check] {name}: {entry['seconds']:.1f} s, {state}", flush=True)


def error_record(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback": traceback.format_exc()[-4000:]}


def targets(sections: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, side by side with what was measured (None where a section is missing)."""

    def get(section: str, *keys: str) -> Any:
        value: Any = sections.get(section, {}).get("result")
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    ours, trl = get("ours", "tokens_per_s"), get("trl", "tokens_per_s")
    ours_mem, trl_mem = get("ours", "peak_memory_gib"), get("trl", "peak_memory_gib")
    share = get("flops", "share_of_peak")
    return {
        "step_within_1e-4": get("step", "passed"),
        "throughput_vs_trl": ours / trl if ours and trl else None,
        "throughput_vs_trl_at_least_2": ours / trl >= 2 if ours and trl else None,
        "peak_memory_ours_not_above_trl": ours_mem <= trl_mem if ours_mem and trl_mem else None,
        "train_pass_share_of_bf16_peak": share,
        "train_pass_share_at_least_0.4": share >= 0.4 if share is not None else None,
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2, default=str))
    partial.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results" / "gpu-check"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (the GPU machine) or cpu (a dry run here)")
    ap.add_argument("--dry-run", action="store_true", help="tiny models: 2 layers, G=2, 2 prompts, 8 tokens")
    ap.add_argument("--out", type=Path, default=default_out, help="folder for gpu_check.json (default: $OUT)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--steps", type=int, help="timed steps after the warm-up (default 3; 1 in a dry run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before torch and transformers load: nothing may reach the network (the GPU machine has none).
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"})
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda, but torch {torch.__version__} sees no GPU: here, run --device cpu --dry-run")
    sizes = DRY if args.dry_run else FULL
    sizes = replace(sizes, steps=args.steps) if args.steps else sizes
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = set(names) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    path = args.out / "gpu_check.json"
    report: dict[str, Any] = {
        "device": args.device,
        "dry_run": args.dry_run,
        "sizes": asdict(sizes),
        "seed": args.seed,
        "environment": environment(device),
        "sections": {name: {"ran": False} for name in SECTIONS},
    }
    for name in names:
        run_section(report, name, lambda n=name: SECTIONS[n](device, sizes, args.seed), path)
    report["ok"] = all(report["sections"][n]["ok"] for n in names)
    write_json(path, report)
    print(f"[gpu_check] {'all sections ok' if report['ok'] else 'some sections FAILED'}: {path}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
