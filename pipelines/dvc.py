"""The one way the product runs DVC: `python -m dvc` with this interpreter, in the project folder.

DVC allows one process per workspace at a time; callers that may overlap (the Prefect flow)
serialise their calls themselves.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

LOCK = "dvc.lock"
GOOD_COPY = Path(".grpo") / "dvc.lock.good"  # the last dvc.lock a DVC command left whole

log = logging.getLogger(__name__)


class DvcError(RuntimeError):
    """A DVC command failed or could not start; the message holds DVC's own last lines and a fix."""


def _whole(data: bytes) -> bool:
    """A dvc.lock DVC can read: a YAML mapping (DVC rewrites it in place, so a full disk or a kill
    can leave it empty or cut short)."""
    try:
        return isinstance(yaml.safe_load(data), dict)
    except yaml.YAMLError:
        return False


def repair_lock(root: Path) -> str | None:
    """Put back the last whole dvc.lock when the current one is empty or cut short (else every later
    DVC command fails on it); without a good copy, remove it, so that DVC records the stages anew.
    Returns what it did, for the log; None when dvc.lock was fine or absent."""
    lock = root / LOCK
    if not lock.exists() or _whole(lock.read_bytes()):
        return None
    good = root / GOOD_COPY
    if good.exists() and _whole(good.read_bytes()):
        staging = lock.with_name(f".{LOCK}.restore")
        staging.write_bytes(good.read_bytes())
        os.replace(staging, lock)
        done = f"{lock} was damaged (empty or cut short): put back the last whole copy from {GOOD_COPY}"
    else:
        lock.unlink()
        done = f"{lock} was damaged and no whole copy was kept: removed, so DVC records the stages anew"
    log.warning(done)
    return done


def _keep_good_copy(root: Path) -> None:
    lock = root / LOCK
    try:
        data = lock.read_bytes()
        if not _whole(data):
            return
        good = root / GOOD_COPY
        good.parent.mkdir(exist_ok=True)
        staging = good.with_name(good.name + ".tmp")
        staging.write_bytes(data)
        os.replace(staging, good)
    except OSError:  # a full disk: keep the older copy
        pass


def run_dvc(root: Path, *args: str, timeout: float = 600) -> str:
    """Run `dvc ARGS` in `root` and return its stdout; a DvcError names the command and what DVC said.

    dvc.lock is checked before and after: DVC rewrites it in place, and a full disk or a kill mid-write
    leaves it empty; then the last whole copy is put back (`repair_lock`) instead of failing every
    later command.
    """
    command = f"dvc {' '.join(args)}"
    repair_lock(root)
    try:
        return _run(root, args, command, timeout)
    finally:
        if repair_lock(root) is None:
            _keep_good_copy(root)


def _run(root: Path, args: tuple[str, ...], command: str, timeout: float) -> str:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DvcError(
            f"`{command}` could not run in {root} ({exc}). Fix: check that DVC is installed in this environment."
        ) from None
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        hint = (
            " Fix: configure a remote (`dvc remote add -d NAME URL`) or pass --no-push."
            if args and args[0] == "push"
            else ""
        )
        raise DvcError(f"`{command}` failed in {root}: {' '.join(said)}.{hint}")
    return proc.stdout
