"""`bf16: auto`: compute in bf16 only where the device has bf16 units (a GPU, or a CPU with bf16 instructions).

bf16 halves the weights' memory and, with AVX-512 BF16 or AMX, runs matmuls several times faster
than fp32. Without them PyTorch's bf16 matmul takes a slow fallback: measured on a 2-core AMD EPYC
(Zen 3, AVX2 only, torch 2.13), 1.3 GFLOP/s in bf16 against 80 in fp32, and one demo training
step took 310 s instead of seconds. So `auto` (the default) means bf16 only where it is native.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any


@cache
def native_bf16() -> bool:
    """True where the CPU has bf16 dot-product instructions (AVX-512 BF16 or AMX-BF16).

    torch.cpu's probes are private but stable since torch 2.1; a build without one reads as False
    (fp32, the safe choice). ARM CPUs read as False too: their bf16 speed was not measured here.
    """
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def gpu_bf16(device: str) -> bool | None:
    """`bf16: auto` for stages placed on a GPU (`runtime.device`): whether it computes in bf16
    natively (every GPU since Ampere does), or None when they run on the CPU."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    return bool(torch.cuda.is_bf16_supported())


def resolve_bf16(value: Any, field: str) -> Any:
    """A config value for `field` (`train.bf16`, `evaluate.bf16`): `auto` becomes this machine's answer.

    An explicit `true` on a CPU without bf16 instructions is kept (it is what was asked for) with a
    warning, since it makes the run tens of times slower than fp32.
    """
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return native_bf16()
        raise ValueError(f"must be true, false or auto, not {value!r}")
    import torch

    # (beside a GPU the value is for it: `runtime.device` puts the stages there by default)
    if value is True and not native_bf16() and not torch.cuda.is_available():
        warnings.warn(
            f"{field}: true on a CPU without bf16 instructions (AVX-512 BF16 or AMX): bf16 matmuls run "
            f"tens of times slower than fp32 here; set {field}: auto (or false)",
            stacklevel=2,
        )
    return value
