"""Where a stage computes: `runtime.device` (auto | cpu | cuda) made into a torch device.

Every stage that runs a model (train, its validation, evaluate, the export-parity probe, `grpo ask`)
places it with `place`; data (rollouts, prompts) stays on the CPU and is moved to the model's
device where it is computed on (`model_device`). Checkpoints and saved weights are always CPU
tensors, so a run on one device resumes or evaluates on the other.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Any

import torch

from pipelines.config import DEVICES, ConfigError


class DeviceError(ConfigError):
    """A device that this machine does not have; the message names the setting to change."""


def resolve(name: str = "auto") -> torch.device:
    """`auto` is CUDA where torch sees a GPU, else the CPU. Under torchrun each rank takes the GPU of
    its LOCAL_RANK (one GPU per process, as NCCL needs).

    >>> resolve("cpu")
    device(type='cpu')
    """
    if name not in DEVICES:
        raise DeviceError(f"runtime.device={name!r}: write one of {', '.join(DEVICES)}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if name == "cuda":
            raise DeviceError(
                "runtime.device=cuda, but torch sees no GPU (torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none: a CPU-only build'}): install a "
                "CUDA build of torch and check `nvidia-smi`, or set runtime.device=auto (or cpu)"
            )
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 is the fast path on `device` (`train.bf16: auto`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from pipelines.precision import native_bf16

    return native_bf16()


def model_device(model: Any) -> torch.device:
    """The device of a model's weights (the CPU for a model without any, such as a remote one)."""
    for p in model.parameters() if hasattr(model, "parameters") else ():
        return p.device
    return torch.device("cpu")


def place(model: Any, device: torch.device) -> Any:
    """`model` on `device`; on CUDA, each rank's GPU is made current first (NCCL and caching need it)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return model.to(device)


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager[Any]:
    """bf16 autocast on `device` (fp32 weights and optimiser state stay fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_metrics(device: torch.device) -> dict[str, float]:
    """The GPU's peak allocated and reserved memory since the last reset, in GiB (nothing on the CPU)."""
    if device.type != "cuda":
        return {}
    return {
        "gpu/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "gpu/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }
