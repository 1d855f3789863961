"""Free disk space before a stage starts: a stage that runs out halfway wastes its work and can
leave files that other tools (DVC) do not write atomically. Each stage names what it needs."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipelines.config import Config, ConfigError
from pipelines.paths import Paths

MB = 1 << 20
MARGIN = 50 * MB  # logs, MLflow's store, DVC's cache links, temporary files


class DiskSpaceError(ConfigError):
    """Not enough free space for a stage; the message names the folder, what is free and what is needed."""


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def needed(stage: str, cfg: Config, paths: Paths) -> tuple[int, str]:
    """(bytes the stage may write, why) from the sizes it works with."""
    reference = _size(paths.reference_dir)
    if stage == "validate":
        source = Path(cfg.data.path) if cfg.data.path and not cfg.data.path.startswith("hf:") else None
        data = _size(source if source is None or source.is_absolute() else paths.root / source) if source else 0
        return 3 * data + MARGIN, "the splits and the rejected rows, up to 3x the dataset"
    if stage == "snapshot":
        return 2 * max(reference, 600 * MB) + MARGIN, "the pinned reference written aside, then renamed"
    if stage == "train":
        keep = cfg.train.keep_checkpoints + 2  # the kept ones, the best, and one being written
        weights = reference if not cfg.train.lora.enabled else max(reference // 20, 30 * MB)
        return keep * weights * 3 + MARGIN, f"{keep} checkpoints of trainable weights and optimiser state"
    if stage == "register":
        return 3 * _size(
            paths.policy_dir
        ) + reference + MARGIN, "the logged model, its pyfunc copy and the export check"
    return MARGIN, "reports and samples"


def check(stage: str, cfg: Config, paths: Paths) -> None:
    """A DiskSpaceError before the stage starts when the project's disk has less free space than it needs."""
    need, why = needed(stage, cfg, paths)
    free = shutil.disk_usage(paths.root).free
    if free < need:
        raise DiskSpaceError(
            f"not enough free disk space for `{stage}` in {paths.root}: {free / MB:,.0f} MB free, it needs about "
            f"{need / MB:,.0f} MB ({why}). Free some space (old checkpoints, `dvc gc`, mlartifacts) and run again"
        )
