"""Checkpoints for exact resume: trainable weights, optimiser, scheduler, RNG, step, data position.

Weights go to safetensors; optimiser and RNG tensors to a torch file read back with
`weights_only=True` (no pickled code); everything else to JSON. A checkpoint folder is complete or
absent: it is written under a temporary name and renamed, then `latest.json` is switched to it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipelines.io import staged_dir, write_json

LATEST = "latest.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    target = folder / f"step-{step:06d}"
    with staged_dir(target) as staging:
        save_file(trainable_state(model), str(staging / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            },
            staging / "optimizer.pt",
        )
        write_json(staging / "state.json", {**state, "step": step})
    write_json(folder / LATEST, {"step": step, "path": target.name})
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest(folder: Path) -> Path | None:
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    target = folder / json.loads(pointer.read_text())["path"]
    return target if (target / "state.json").exists() else None


def load(target: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore everything saved in `target` and return its JSON state (step, sampler, history...)."""
    _restore_trainable(target, model)
    blob = torch.load(target / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return json.loads((target / "state.json").read_text())


BEST = "best"


def save_best(folder: Path, step: int, model: torch.nn.Module, accuracy: float) -> Path:
    """The trainable weights of the best validated step, in checkpoints/best (replaced whole)."""
    target = folder / BEST
    with staged_dir(target) as staging:
        save_file(trainable_state(model), str(staging / "trainable.safetensors"))
        write_json(staging / "best.json", {"step": step, "accuracy": accuracy})
    return target


def load_best(folder: Path, model: torch.nn.Module) -> int:
    """Put the best validated step's trainable weights into `model`; return that step."""
    target = folder / BEST
    _restore_trainable(target, model)
    return int(json.loads((target / "best.json").read_text())["step"])


def load_weights(target: Path, model: torch.nn.Module) -> None:
    """Put the trainable weights saved in `target` (a step-N checkpoint or best/) into `model`, nothing else."""
    _restore_trainable(target, model)


def _restore_trainable(target: Path, model: torch.nn.Module) -> None:
    weights = load_file(str(target / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise RuntimeError(f"{target} does not match the model being trained (parameters {sorted(missing)[:3]}...)")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
