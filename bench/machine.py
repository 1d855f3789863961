"""What machine a benchmark ran on: CPU model, the bf16 matrix units it has, cores, torch threads.

The project's machines have changed kind between sessions (an Intel Xeon with AMX-BF16, AMD EPYCs
with AVX-512 BF16 and no AMX, AMD EPYCs with AVX2 only): their bf16 matmul peaks differ by 3x and
TRL's step time by 50%, so every recorded result carries the `describe()` line and is compared only
with results of the same kind. `slug()` names that kind, and results land in `bench/results/<slug>/`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ('model name', 'vendor_id', 'cpu family', 'flags')."""
    fields: dict[str, str] = {}
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if not line.strip():
                if fields:
                    break  # the first processor's block is enough
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


def describe(threads: int | None = None) -> str:
    """One line, e.g. 'AMD EPYC, avx512_bf16, 2 cores, x86_64, torch threads 2'."""
    info = _cpuinfo()
    model, flags = info.get("model name", "unknown CPU"), set(info.get("flags", "").split())
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags] or ["no bf16 matrix instructions"]
    parts = [model, "+".join(units), f"{os.cpu_count()} cores", os.uname().machine]
    if threads is not None:
        parts.append(f"torch threads {threads}")
    return ", ".join(parts)


def slug(info: dict[str, str] | None = None) -> str:
    """A short name for the kind of CPU, the folder under bench/results/ its results go to.

    'xeon-amx' (Intel with AMX-BF16), 'epyc-avx512-bf16' (AMD Zen 4, family 25, with AVX-512 BF16;
    'epyc-zen5-avx512-bf16' for Zen 5, family 26, which made twice the Xeon's demo steps a minute),
    'epyc-avx2' (AMD with AVX2 only; 'epyc-zen2-avx2' for Zen 2, family 23, which measured slower than
    Zen 3), and the same pattern for other combinations ('xeon-avx512-bf16', 'xeon-avx2', ...).
    """
    info = _cpuinfo() if info is None else info
    flags = set(info.get("flags", "").split())
    vendor = info.get("vendor_id", "")
    maker = {"GenuineIntel": "xeon", "AuthenticAMD": "epyc"}.get(vendor, os.uname().machine.replace("_", "-"))
    if "amx_bf16" in flags:
        units = "amx"
    elif "avx512_bf16" in flags:
        units = "zen5-avx512-bf16" if maker == "epyc" and info.get("cpu family") == "26" else "avx512-bf16"
    elif "avx2" in flags:
        units = "zen2-avx2" if maker == "epyc" and info.get("cpu family") == "23" else "avx2"
    else:
        units = "generic"
    return f"{maker}-{units}"


def results_dir() -> Path:
    """bench/results/<slug>/ for this machine: the default folder every benchmark script writes to."""
    return RESULTS / slug()


if __name__ == "__main__":
    if "--slug" in sys.argv[1:]:  # for shell commands: --out bench/results/$(python bench/machine.py --slug)/...
        print(slug())
    else:
        print(describe())
        print(f"results go to {results_dir()}")
