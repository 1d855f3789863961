"""A sampling copy of the policy: LoRA merged into plain weights, optionally held in bf16.

Sampling is most of a GRPO step on CPU, and its cost is per-token overhead, not arithmetic: a peft
model runs two extra small matmuls beside each of ~200 linear layers at every generated token, and
bf16 autocast re-casts every weight at every token. A plain copy with the adapter merged in, stored
in bf16, samples 2-3x faster here (measured in bench/RESULTS.md). It is refreshed from the policy
after every optimiser step, so sampling stays on-policy up to bf16 rounding; the loss uses the
trained model's own log-probs and, by default, weights each completion by the importance ratio
between the trained model and this copy (grpo/sampling_correction.py), as TRL does for vLLM.

Under FSDP (grpo/sharding.py) the copy is made from the whole model before it is sharded, and each
`sync` gathers every weight whole from the shards: a collective, which every rank calls in turn.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from pipelines.generation import shared_prefix


class SamplingCopy:
    """The policy's sampling copy: `.model` to sample from, `.sync()` after every optimiser step."""

    def __init__(self, policy: Any, dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None) -> None:
        """`device`: where the copy samples (default: where the policy is; FSDP's policy is still on the CPU)."""
        self.policy = policy
        self.dtype = dtype
        self.is_peft = hasattr(policy, "peft_config")
        base = policy.get_base_model() if self.is_peft else policy
        self.model = _plain_copy(base, dtype)
        if device is not None:
            self.model.to(device)
        shared_prefix.enable(self.model)  # a group's completions read one copy of its prompt's cache
        self.model.eval()
        self.model.requires_grad_(False)
        self._targets = self._pair_parameters(base)
        self.sync()

    def _pair_parameters(self, base: Any) -> list[tuple[torch.Tensor, Any, str]]:
        """(destination weight, source module or weight's name, kind) for every weight that training can change.

        Weights are found by name at each sync: FSDP replaces the policy's parameters with sharded ones."""
        own = dict(self.model.named_modules())
        pairs = []
        if self.is_peft:
            from peft.tuners.lora import LoraLayer

            for name, module in base.named_modules():
                if isinstance(module, LoraLayer):
                    pairs.append((own[name].weight, module, "lora"))
        else:
            params = dict(self.model.named_parameters())
            for name, p in base.named_parameters():
                if p.requires_grad:
                    pairs.append((params[name], name, "param"))
        return pairs

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the policy's current weights (base + scaled B @ A for LoRA layers) into the sampler."""
        from torch.distributed.tensor import DTensor

        current = dict(self.policy.named_parameters()) if not self.is_peft else {}
        for dest, source, kind in self._targets:
            if kind == "lora":
                merged = source.get_base_layer().weight
                for adapter in source.active_adapters:
                    merged = merged + source.get_delta_weight(adapter)
                dest.copy_(merged.to(self.dtype))
            else:
                weight = current[source]
                dest.copy_((weight.full_tensor() if isinstance(weight, DTensor) else weight).to(self.dtype))


def _plain_copy(base: Any, dtype: torch.dtype) -> Any:
    """A copy of `base` without peft's wrappers: LoRA layers become the plain layers they wrap."""
    from peft.tuners.lora import LoraLayer

    clone = copy.deepcopy(base)
    for name, module in list(clone.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = clone.get_submodule(parent_name) if parent_name else clone
            setattr(parent, child, module.get_base_layer())
    return clone.to(dtype)
