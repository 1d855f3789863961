"""What machine a benchmark ran on: CPU model, the bf16 matrix units it has, cores, torch threads.

The project's machines have changed kind between sessions (an Intel Xeon with AMX-BF16, then an
AMD EPYC with AVX-512 BF16 and no AMX): their bf16 matmul peaks differ by 3x and TRL's step time
by 50%, so every recorded result carries this line and is compared only with results of the same one.
"""

from __future__ import annotations

import os
from pathlib import Path


def describe(threads: int | None = None) -> str:
    """One line, e.g. 'AMD EPYC, avx512_bf16, 2 cores, x86_64, torch threads 2'."""
    model, flags = "unknown CPU", set()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if model != "unknown CPU" and flags:
                break
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags] or ["no bf16 matrix instructions"]
    parts = [model, "+".join(units), f"{os.cpu_count()} cores", os.uname().machine]
    if threads is not None:
        parts.append(f"torch threads {threads}")
    return ", ".join(parts)


if __name__ == "__main__":
    print(describe())
