"""Data-parallel GRPO under torchrun: the collectives the training loop calls.

How a step is split so that N processes make exactly the update one process makes:
- every rank draws the same global batch of prompts (same seeded PromptSampler) and samples only
  its own contiguous slice (`World.shard`); groups stay whole, so each rank scores its own groups;
- each completion is sampled from its own generator, seeded from (seed, step, prompt index in the
  global batch, completion index) (sampling.prompt_seed, row_generators), so completions do not
  depend on the number of processes;
- rewards are gathered (`World.gather`): every rank computes the advantages of the whole batch,
  which `scale_rewards: batch` and `normalize_then_sum` need, then keeps its own rows;
- each rank weights its loss by its share of the loss's normaliser (`loss_share`) and gradients are
  summed (`World.all_reduce_grads`), which gives the single-process gradient for every loss_type;
- only rank 0 writes checkpoints, MLflow, metrics and the adapter (the rollout ledger gathers every
  rank's slice first, and under FSDP every rank joins the gather of a checkpoint's whole tensors);
- with dynamic sampling every resampling round is sharded the same way, so a round of fewer prompts
  than processes, or a step whose kept groups all came from other ranks, leaves a process with an
  empty slice: it samples nothing (`Rollout.empty`), its loss is 0 with share 0, and it still joins
  every gather and reduction. Kept groups are not moved between processes: the training pass can
  be uneven across them.

With `train.fsdp` (full fine-tuning) each rank holds only a shard of the weights, gradients and
optimiser state, and FSDP sums the gradients itself (sharding.py); the rest of the above holds.

The ranks are started by launcher.py. Collectives run on gloo for CPU tensors and on nccl for CUDA
tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.config import ConfigError, TrainConfig
from pipelines.grpo.loss import TOKEN_NORMALISED


class DistributedError(RuntimeError):
    """A data-parallel run that failed; the message says where to look."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; every method is a no-op (or identity) for one process."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of n items (sizes differ by at most one).

        >>> [World(r, 3).shard(8) for r in range(3)]
        [slice(0, 2, None), slice(2, 5, None), slice(5, 8, None)]
        """
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` concatenated along dim 0 in rank order (sizes may differ)."""
        if self.size == 1:
            return tensor
        import torch.distributed as dist

        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([tensor.size(0)]))
        padded = torch.zeros((max(int(s) for s in sizes), *tensor.shape[1:]), dtype=tensor.dtype)
        padded[: tensor.size(0)] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)  # gloo needs equal shapes: pad, then cut each part back
        return torch.cat([part[: int(size)] for part, size in zip(parts, sizes, strict=True)])

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, value: float) -> float:
        return self._reduce(value, "sum")

    def max(self, value: float) -> float:
        return self._reduce(value, "max")

    def _reduce(self, value: float, op: str) -> float:
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(box, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return float(box)

    def average(self, values: dict[str, float], weight: float) -> dict[str, float]:
        """Means of per-rank means, each rank counting `weight` (its tokens, its completions...)."""
        if self.size == 1:
            return dict(values)
        import torch.distributed as dist

        keys = list(values)
        box = torch.tensor([values[k] * weight if weight else 0.0 for k in keys] + [weight], dtype=torch.float64)
        dist.all_reduce(box)
        total = float(box[-1])
        return {k: float(box[i]) / total if total else float("nan") for i, k in enumerate(keys)}

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks, in one collective."""
        if self.size == 1:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def broadcast(self, params: list[torch.nn.Parameter]) -> None:
        """Rank 0's values into every rank's `params` (the same starting point, whatever the seed did)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


SINGLE = World()


def under_torchrun() -> bool:
    """True inside a process that torchrun (or another env:// launcher) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check(train: TrainConfig, size: int) -> None:
    """Refuse what data parallelism does not support yet, naming the fix."""
    if size == 1:
        return
    if train.prompts_per_step < size:
        raise ConfigError(
            f"train.prompts_per_step={train.prompts_per_step} leaves some of the {size} processes without a "
            f"prompt: raise it to at least {size}, or lower train.num_processes"
        )
    devices = torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)
    if size > devices:
        kind = "GPUs" if torch.cuda.is_available() else "CPU cores"
        raise ConfigError(
            f"train.num_processes={size} is more than this machine's {devices} {kind}: each process needs one; "
            f"lower it to at most {devices}"
        )


@contextmanager
def world(train: TrainConfig) -> Iterator[World]:
    """The process group for this run: one process, or the ranks torchrun started."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield SINGLE
        return
    import torch.distributed as dist

    # gloo for CPU tensors (this trainer's), nccl for CUDA tensors where a GPU is present.
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        current = World(rank=dist.get_rank(), size=dist.get_world_size())
        check(train, current.size)
        yield current
    finally:
        dist.destroy_process_group()


def loss_share(loss_type: str, mask: torch.Tensor, world: World) -> float:
    """The factor for this rank's loss so that the sum over ranks is the global batch's loss.

    `grpo`, `sapo` and `dr_grpo` divide by the number of sequences, `bnpo`, `dapo` and `cispo` by
    the number of completion tokens (in one process both are the whole batch's): a rank's loss,
    normalised by its own count, is scaled by its own count over the global one.
    """
    if world.size == 1:
        return 1.0
    local = float(mask.sum()) if loss_type in TOKEN_NORMALISED else float(mask.size(0))
    total = world.sum(local)
    return local / total if total else 0.0
