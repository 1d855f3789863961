"""Group-relative advantages from per-function rewards (TRL's semantics, DeepSeekMath's formula)."""

from __future__ import annotations

from typing import Literal

import torch

Scale = Literal["group", "batch", "none"]
Aggregation = Literal["sum_then_normalize", "normalize_then_sum"]


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaN (torch.std with NaN-awareness)."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~x.isnan()).sum(dim=dim, keepdim=keepdim).float()
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=keepdim)
    return torch.sqrt(var * count / (count - 1).clamp(min=1.0))


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: Scale = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, per-group std) for `rewards` laid out group after group.

    `group` divides by each group's std (DeepSeekMath), `batch` by the whole batch's std,
    `none` keeps raw differences (Dr. GRPO). Groups with equal rewards get advantage 0.
    A NaN reward (a completion no function scored) is left out of the mean and the std and gets
    advantage 0, as in TRL; a group with no scored completion has std NaN.

    >>> adv, std = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2, "none")
    >>> adv.tolist(), std.tolist()
    ([0.5, -0.5, 0.0, 0.0], [0.7071067690849304, 0.0])
    >>> group_advantages(torch.tensor([2.0, 1.0, 0.0, float("nan")]), 4, "none")[0].tolist()
    [1.0, 0.0, -1.0, 0.0]
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    group_std = nanstd(grouped, dim=1)
    if scale == "group":
        centred = centred / (group_std.unsqueeze(1) + eps)
    elif scale == "batch":
        centred = centred / (nanstd(rewards) + eps)
    return centred.reshape(-1).nan_to_num(nan=0.0), group_std


def combine_rewards(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over reward functions; NaN (a function's `None`) counts as absent.

    A completion that no function scored (all NaN) stays NaN, not 0: it is "not scored", and a 0
    would enter its group's mean and std and give it an advantage (TRL's `unscorable_mask`).

    >>> per_fn = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), float("nan")]])
    >>> combine_rewards(per_fn, torch.tensor([1.0, 0.5])).tolist()
    [1.0, 0.5, nan]
    """
    combined = (per_function * weights.unsqueeze(0)).nansum(dim=1)
    return combined.masked_fill(per_function.isnan().all(dim=1), float("nan"))


def advantages_from_rewards(
    per_function: torch.Tensor,
    weights: torch.Tensor,
    group_size: int,
    scale: Scale = "group",
    aggregation: Aggregation = "sum_then_normalize",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, combined rewards, per-group std of the combined rewards).

    `sum_then_normalize`: weighted sum of the functions, then group-relative advantages.
    `normalize_then_sum`: each function normalised within its group first, then the weighted sum,
    then normalised over the batch (so one function with a large scale cannot drown the others).

    A function's None (NaN) is absent from its sums, means and stds; a completion that every
    function left unscored has combined reward NaN, takes no part in any mean or std, and gets
    advantage 0, exactly as TRL 1.16 (`_generate_and_score_completions`, `unscorable_mask`).
    """
    rewards = combine_rewards(per_function, weights)
    if aggregation == "sum_then_normalize":
        advantages, group_std = group_advantages(rewards, group_size, scale, eps)
        return advantages, rewards, group_std
    if aggregation != "normalize_then_sum":
        raise ValueError(f"unknown multi_objective_aggregation {aggregation!r}")
    n_fn = per_function.size(1)
    grouped = per_function.view(-1, group_size, n_fn)
    normalised = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + eps)
    summed = combine_rewards(normalised.view(-1, n_fn), weights)  # NaN exactly where no function scored
    advantages = ((summed - torch.nanmean(summed)) / (nanstd(summed) + eps)).nan_to_num(nan=0.0)
    return advantages, rewards, nanstd(rewards.view(-1, group_size), dim=1)
