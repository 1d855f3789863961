"""Checkpoints for exact resume: trainable weights, optimiser, scheduler, RNG, step, data position.

Weights go to safetensors; optimiser and RNG tensors to a torch file read back with
`weights_only=True` (no pickled code); everything else to JSON. A checkpoint folder is complete or
absent: it is written under a temporary name, its files' sha256 go to `files.json`, every file is
flushed to disk (fsync) and the folder renamed, then `latest.json` is switched to it. Resume takes
the newest checkpoint whose files still match their hashes: a file cut short by a crash or a full
disk, or a damaged `latest.json`, makes it fall back to the previous intact step, saying so, instead
of failing every later run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipelines.io import staged_dir, write_json

LATEST = "latest.json"
MANIFEST = "files.json"

log = logging.getLogger(__name__)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights as CPU tensors: a checkpoint reads the same whichever device wrote it."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """A checkpoint of a plain model and its optimiser (`write`, for state gathered under FSDP)."""
    return write(folder, step, trainable_state(model), optimizer.state_dict(), scheduler, state, keep)


def write(
    folder: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """checkpoints/step-N from the trainable weights and `optimizer.state_dict()`, whole (grpo/sharding.py
    gathers them under FSDP in this same format, so either kind of run resumes the other's)."""
    target = folder / f"step-{step:06d}"
    with staged_dir(target) as staging:
        save_file(weights, str(staging / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": _on_cpu(optimizer_state),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            },
            staging / "optimizer.pt",
        )
        write_json(staging / "state.json", {**state, "step": step})
        _seal(staging)
    write_json(folder / LATEST, {"step": step, "path": target.name})
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _on_cpu(value: Any) -> Any:
    """A state dict with every tensor copied to the CPU (the optimiser's moments live on the GPU there)."""
    if isinstance(value, torch.Tensor):
        return value.to("cpu")  # itself when already there: torch.save writes it before training goes on
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_on_cpu(v) for v in value]
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _seal(staging: Path) -> None:
    """files.json with each file's sha256, and every file on disk before the folder is renamed."""
    files = sorted(p for p in staging.iterdir() if p.is_file())
    write_json(staging / MANIFEST, {p.name: _sha256(p) for p in files})
    for path in [*files, staging / MANIFEST]:
        with path.open("rb") as fh:
            os.fsync(fh.fileno())


def damage(target: Path) -> str | None:
    """Why the checkpoint in `target` cannot be resumed from (a file missing, cut short or changed),
    or None when it is intact. Checkpoints written before files.json existed are checked for their files."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except FileNotFoundError:
        manifest = None
    except (OSError, ValueError):
        return f"{MANIFEST} is unreadable"
    names = manifest or {"trainable.safetensors": None, "optimizer.pt": None, "state.json": None}
    for name, sha in names.items():
        path = target / name
        if not path.is_file():
            return f"{name} is missing"
        if sha is not None and _sha256(path) != sha:
            return f"{name} does not match its sha256 (cut short or changed)"
    try:
        json.loads((target / "state.json").read_text())
    except (OSError, ValueError):
        return "state.json is unreadable"
    return None


def latest(folder: Path) -> Path | None:
    """The newest intact checkpoint: the one `latest.json` names, else (damaged, or `latest.json`
    itself damaged) the newest step folder whose files match their hashes, with a warning."""
    candidates = sorted(folder.glob("step-*"), reverse=True)
    try:
        named = folder / json.loads((folder / LATEST).read_text())["path"]
        candidates = [named, *(c for c in candidates if c != named)]
    except FileNotFoundError:
        if not candidates:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s is damaged: looking for the newest intact checkpoint instead", folder / LATEST)
    skipped = []
    for target in candidates:
        why = damage(target) if target.is_dir() else "is missing"
        if why is None:
            if skipped:
                log.warning("checkpoint(s) %s damaged; resuming from %s instead", "; ".join(skipped), target.name)
            return target
        skipped.append(f"{target.name}: {why}")
    if skipped:
        log.warning("no intact checkpoint (%s): training starts again from step 0", "; ".join(skipped))
    return None


def read(target: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainable weights, optimiser/scheduler/RNG blob, JSON state) of the checkpoint in `target`, on the CPU.

    `tensors=False` leaves out the weights and the optimiser state (`{}` for both): what an FSDP rank
    that receives them from rank 0 reads, without holding a whole copy of them even for a moment.
    """
    weights = load_file(str(target / "trainable.safetensors")) if tensors else {}
    # Read onto the CPU whichever device wrote it; load_state_dict moves the state to each weight's device.
    # Memory-mapped where the optimiser state is left out: it is then never read.
    blob = torch.load(target / "optimizer.pt", weights_only=True, map_location="cpu", mmap=not tensors)
    if not tensors:
        blob["optimizer"] = {}
    return weights, blob, json.loads((target / "state.json").read_text())


def load(target: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore everything saved in `target` and return its JSON state (step, sampler, history...)."""
    weights, blob, state = read(target)
    restore(model, weights, str(target))
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return state


BEST = "best"


def save_best(folder: Path, step: int, weights: dict[str, torch.Tensor], accuracy: float) -> Path:
    """The trainable weights of the best validated step (`trainable_state`), in checkpoints/best (replaced whole)."""
    target = folder / BEST
    with staged_dir(target) as staging:
        save_file(weights, str(staging / "trainable.safetensors"))
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
    restore(model, load_file(str(target / "trainable.safetensors")), str(target))


def restore(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy `weights` (`trainable_state`'s names) into a plain model's trainable parameters."""
    params = dict(model.named_parameters())
    missing = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise RuntimeError(f"{source} does not match the model being trained (parameters {sorted(missing)[:3]}...)")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
