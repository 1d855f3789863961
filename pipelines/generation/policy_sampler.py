"""What training samples from: a local sampling copy of the policy, or the policy on a vLLM server.

Both answer the same two questions the trainer asks: `.model` (what `generate()` samples from) and
`.sync()` (after every optimiser step: the next rollout must come from the updated policy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pipelines.config import Config, ConfigError
from pipelines.generation.sampling_copy import SamplingCopy
from pipelines.paths import Paths


@contextmanager
def policy_sampler(cfg: Config, policy: Any, paths: Paths, made: SamplingCopy | None = None) -> Iterator[Any]:
    """A SamplingCopy for the local backends; for `vllm`, a server session with the adapter pushed to it.

    `made`: a copy made earlier (FSDP makes it before sharding the policy), synced with the policy now.
    """
    if made is not None:
        made.sync()
        yield made
        return
    if cfg.runtime.rollout_backend != "vllm":
        yield SamplingCopy(policy, sampling_dtype(cfg))
        return
    from pipelines.generation.vllm_backend import RemotePolicy, check_served_base
    from pipelines.generation.vllm_server import vllm_session

    if cfg.train.num_processes > 1:
        raise ConfigError(
            "runtime.rollout_backend=vllm runs one trainer process against the server; set train.num_processes=1 "
            "(the server batches every prompt of a step itself)"
        )
    session = vllm_session(
        cfg.runtime.vllm, paths.root, paths.reference_dir, cfg.train.lora.r, cfg.train.seed, bf16=cfg.train.bf16
    )
    with session as (client, base):
        if cfg.runtime.vllm.url:  # a server this did not start from models/reference: check what it serves
            check_served_base(client, base, policy, cfg.runtime.vllm.url)
        remote = RemotePolicy(policy, client, base, paths.root / ".vllm" / "adapters")
        try:
            yield remote
        finally:
            remote.close()


def sampling_dtype(cfg: Config) -> torch.dtype:
    """The local sampling copy's dtype: bf16 when training computes in bf16 (sampling_copy.py says why)."""
    return torch.bfloat16 if cfg.train.bf16 else torch.float32
