"""Group-relative advantages: each completion's reward minus its group's mean, optionally scaled."""

from __future__ import annotations

from typing import Literal

import torch


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: Literal["group", "batch", "none"] = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, per-group std) for `rewards` laid out group after group.

    `group` divides by each group's std (DeepSeekMath), `batch` by the whole batch's std,
    `none` keeps raw differences (Dr. GRPO). Groups with equal rewards get advantage 0.

    >>> adv, std = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2, "none")
    >>> adv.tolist(), std.tolist()
    ([0.5, -0.5, 0.0, 0.0], [0.7071067690849304, 0.0])
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    group_std = grouped.std(dim=1)
    if scale == "group":
        centred = centred / (group_std.unsqueeze(1) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    return centred.reshape(-1), group_std


def combine_rewards(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over reward functions; NaN (a function's `None`) counts as absent.

    >>> combine_rewards(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), torch.tensor([1.0, 0.5])).tolist()
    [1.0, 0.5]
    """
    return (per_function * weights.unsqueeze(0)).nansum(dim=1)
