"""The user's params.yaml, kept aside while `grpo run --preset NAME` has a preset's values in it.

`grpo run` writes a preset's keys into params.yaml so that dvc.lock records the values that ran
(as `dvc exp run -S` does). So that a preset never stays there by surprise, the file as it was
before the first preset is kept byte for byte in `.grpo/params.before-preset.yaml` (git-ignored);
`grpo params restore` puts it back, and `make demo` does so first whenever params.yaml carries a
preset label.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

KEPT = Path(".grpo") / "params.before-preset.yaml"
# Where `restore` leaves the preset's params.yaml it replaced: edits made since are not lost.
REPLACED = Path(".grpo") / "params.replaced.yaml"


class KeptParamsError(RuntimeError):
    """Nothing to restore; the message says what to do instead."""


def preset_label(params: Path) -> str | None:
    """The `preset:` label params.yaml carries (what `grpo run --preset` last wrote), else None."""
    try:
        data = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    label = data.get("preset") if isinstance(data, dict) else None
    return str(label) if label else None


def keep_before_preset(root: Path) -> Path | None:
    """Copy params.yaml to KEPT unless it already holds a preset's values (the kept copy then
    still is the user's own file). Returns the kept file, or None when there is none."""
    params, kept = root / "params.yaml", root / KEPT
    if preset_label(params) is not None:
        return kept if kept.exists() else None
    _copy_atomically(params, kept)
    return kept


@dataclass
class Restored:
    preset: str | None  # the preset whose values params.yaml held
    replaced: Path | None  # where that params.yaml now is


def restore(root: Path) -> Restored:
    """Put the kept params.yaml back in one rename; the file it replaces goes to REPLACED."""
    params, kept = root / "params.yaml", root / KEPT
    label = preset_label(params)
    if label is None:
        raise KeptParamsError("params.yaml carries no preset label (`preset: null`): it is your own; nothing restored")
    if not kept.exists():
        raise KeptParamsError(
            f"params.yaml holds the {label!r} preset's values but no copy of yours was kept in {KEPT}; "
            "`git checkout params.yaml` gives back the committed one"
        )
    replaced = None
    if params.exists():
        replaced = root / REPLACED
        _copy_atomically(params, replaced)
    os.replace(kept, params)
    return Restored(preset=label, replaced=replaced)


def _copy_atomically(source: Path, target: Path) -> None:
    """Byte-for-byte copy, written beside `target` and renamed over it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    shutil.copymode(source, tmp)
    os.replace(tmp, target)
