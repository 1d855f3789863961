"""Full fine-tuning sharded over the processes with PyTorch FSDP2 (`train.fsdp`, `fully_shard`).

Without it every process of a data-parallel run (distributed.py) holds the whole model, its
gradients and AdamW's two moments: 16 bytes a weight in fp32, which is what keeps a 7B model off
an 80 GB GPU. Under FSDP each process keeps 1/N of them and gathers a layer's weights only while
that layer computes. What the rest of the loop relies on:
- Every rank loads the same pinned reference on the CPU; the sampling copy is made from the whole
  model first (rollouts need every weight on every rank), then `shard` keeps each rank's part of
  every decoder layer and of the rest (embeddings, final norm, LM head) and moves it to the device.
  The frozen KL reference (beta > 0) is sharded the same way, so no rank holds a whole copy of it.
- Gradients are summed over the ranks, not averaged (FSDP's default): each rank's loss is already
  weighted by its `loss_share`, so the sum is one process's gradient for every loss type.
- FSDP gathers a layer's weights at every call of the model and reduces its gradients after
  every backward through it, so every rank must call the model as often as the others: the
  log-prob pass runs each rollout in one call (logprobs.py), not one call per length bucket of
  this rank's own completions.
- Checkpoints, the best step and the saved policy hold whole tensors in the format one process
  without FSDP writes (`full_trainable_state`, `full_optimizer_state`): every rank joins the
  gather (a collective), rank 0 writes; a checkpoint resumes with or without FSDP, on any number
  of processes.
- One process with `train.fsdp` on trains the plain model: there is nothing to shard.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipelines.config import Config, TrainConfig
from pipelines.generation.sampling_copy import SamplingCopy
from pipelines.grpo import checkpoint
from pipelines.grpo.distributed import World
from pipelines.paths import Paths

log = logging.getLogger(__name__)


def enabled(train: TrainConfig, world: World) -> bool:
    """Whether this run shards: `train.fsdp` on more than one process."""
    return train.fsdp and world.size > 1


def is_sharded(model: Any) -> bool:
    """Whether `model` was sharded by `shard` (its weights are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: Any, reference: Any | None, device: torch.device, sampling_dtype: torch.dtype) -> SamplingCopy:
    """Shard the policy (and the frozen reference) over the ranks, in place, onto `device`.

    Returns the policy's sampling copy, made first from the whole model: after sharding no rank
    holds it whole. The models come in on the CPU (policy.build), so that a model larger than one
    GPU is never placed whole on one: FSDP moves each layer's shard to `device` as it shards it.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    made = SamplingCopy(model, sampling_dtype, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh takes the current GPU
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    _fully_shard(model, mesh, reshard_root=None)
    for module in model.modules():
        if is_sharded(module):
            _sum_gradients(module)
    if reference is not None:
        # Only forward passes, no backward to free the root's weights: reshard them after each.
        _fully_shard(reference, mesh, reshard_root=True)
    if dist.get_rank() == 0:
        log.info(
            "FSDP: each of the %d processes holds 1/%d of the policy's weights, gradients and optimiser state%s",
            dist.get_world_size(), dist.get_world_size(), " and of the KL reference" if reference is not None else "",
        )  # fmt: skip
    return made


def _fully_shard(model: Any, mesh: Any, reshard_root: bool | None) -> None:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, LM head, and any
    layer of a model that names none): a layer's weights are whole only while it computes."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())  # transformers' decoder layers
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    # None keeps FSDP's default for the root (whole from forward to backward, which needs it next).
    fully_shard(model, mesh=mesh, **({} if reshard_root is None else {"reshard_after_forward": reshard_root}))


def _sum_gradients(module: Any) -> None:
    """Make `module`'s reduce-scatter sum the ranks' gradients instead of averaging them."""
    # set_gradient_divide_factor since torch 2.8 (set_reduce_scatter_divide_factor before, deprecated after).
    divide = getattr(module, "set_gradient_divide_factor", None) or module.set_reduce_scatter_divide_factor
    divide(1.0)
    # A factor other than the world size asks NCCL for PREMUL_SUM, which gloo lacks: forced to a plain
    # sum (then a division by 1) where this torch can (2.8 and later), which NCCL runs as well.
    force_sum = getattr(module, "set_force_sum_reduction_for_comms", None)
    if force_sum is not None:
        force_sum(True)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it, in the same order); a plain
    tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """`clip_grad_norm_` over the whole model's gradients: under FSDP its norm is a DTensor, made whole."""
    return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))


def all_finite(params: Any) -> bool:
    """Whether every weight is finite: each rank checks its shards, and all ranks agree (a collective
    under FSDP, so that no rank stops while the others wait for it)."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    local = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p.detach()).all()) for p in params)
    if not any(isinstance(p, DTensor) for p in params):
        return local
    import torch.distributed as dist

    flag = torch.tensor([1.0 if local else 0.0])  # a CPU tensor: gloo takes it whatever the device
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _trainable_names(model: Any) -> list[str]:
    """The trainable weights' names, in the order the optimiser holds them (policy.trainable_parameters)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def full_trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """`checkpoint.trainable_state` of the whole model: the same names and shapes, CPU tensors.

    Under FSDP a collective: every rank calls it, rank 0 gets the tensors and the others `{}`.
    """
    if not is_sharded(model):
        return checkpoint.trainable_state(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    whole = get_model_state_dict(model, options=_options(cpu_offload=True))
    if not whole:  # not rank 0
        return {}
    return {name: whole[name].contiguous() for name in _trainable_names(model)}


def load_trainable_state(model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Put whole trainable weights into the sharded `model`: rank 0 holds them (`full_trainable_state`'s
    format), the others pass `{}`; each rank keeps its shard. A collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    whole = {}
    if weights:  # rank 0
        names = set(_trainable_names(model))
        if set(weights) != names:
            missing = sorted(set(weights) ^ names)
            raise RuntimeError(f"the saved weights do not match the model being trained (parameters {missing[:3]}...)")
        # A tied weight (the LM head reusing the embedding) goes under each of its names: a name left
        # out would be loaded with the weight's old value, over the new one.
        canonical = {id(p): name for name, p in model.named_parameters()}
        whole = {alias: weights[canonical[id(p)]] for alias, p in model.named_parameters(remove_duplicate=False)}
    set_model_state_dict(model, whole, options=_options(strict=False, broadcast_from_rank0=True))


def full_optimizer_state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` of the whole model, in its plain format (weights numbered in order).

    Under FSDP a collective: every rank calls it, rank 0 gets CPU tensors and the others `{}`.
    torch.distributed.checkpoint names each weight by its name instead of its number; the plain
    format is what lets a checkpoint written under FSDP resume in one process, and the other way round.
    """
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not by_name:
        return {}
    number: dict[str, int] = {}
    groups = []
    for group in by_name["param_groups"]:
        for name in group["params"]:
            number[name] = len(number)
        groups.append({**group, "params": [number[name] for name in group["params"]]})
    return {"state": {number[name]: value for name, value in by_name["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: Any, optimizer: torch.optim.Optimizer, plain: dict[str, Any]) -> None:
    """Put a plain `optimizer.state_dict()` of the whole model into the sharded optimiser: rank 0 holds it,
    the others pass `{}`. A collective."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not plain:  # not rank 0: receives its shards
        set_optimizer_state_dict(model, optimizer, {}, options=_options(broadcast_from_rank0=True))
        return
    names_of = {id(p): name for name, p in model.named_parameters()}
    order = [names_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    numbers = [n for group in plain["param_groups"] for n in group["params"]]
    if len(numbers) != len(order):
        raise RuntimeError(f"the saved optimiser state holds {len(numbers)} weights, the model trains {len(order)}")
    name = dict(zip(numbers, order, strict=True))
    by_name = {
        "state": {name[n]: value for n, value in plain["state"].items()},
        "param_groups": [{**group, "params": [name[n] for n in group["params"]]} for group in plain["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_options(broadcast_from_rank0=True))


def load_checkpoint(target: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """`checkpoint.load` into a sharded model and optimiser: rank 0 reads the tensors and sends each rank
    its shards (no other rank holds a whole copy); every rank reads the scheduler, RNG and JSON state."""
    import torch.distributed as dist

    weights, blob, state = checkpoint.read(target, tensors=dist.get_rank() == 0)
    load_trainable_state(model, weights)
    load_optimizer_state(model, optimizer, blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return state


def gathered_policy(model: Any, cfg: Config, paths: Paths, world: World) -> Any | None:
    """The trained policy whole, as one plain model on the CPU on rank 0 (None on the others).

    A collective. What rank 0 does at the end (the best step's weights, models/policy, the logged
    models) then runs on the same kind of model as in one process, and saves the same files.
    """
    weights = full_trainable_state(model)
    if not world.is_main:
        return None
    from pipelines.snapshot.loading import load_reference

    plain, _ = load_reference(paths.reference_dir, cfg.snapshot.trust_remote_code)
    plain.requires_grad_(True)
    checkpoint.restore(plain, weights, "the gathered weights")
    return plain
