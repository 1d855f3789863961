"""The one way the product runs DVC: `python -m dvc` with this interpreter, in the project folder.

DVC allows one process per workspace at a time; callers that may overlap (the Prefect flow)
serialise their calls themselves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class DvcError(RuntimeError):
    """A DVC command failed or could not start; the message holds DVC's own last lines and a fix."""


def run_dvc(root: Path, *args: str, timeout: float = 600) -> str:
    """Run `dvc ARGS` in `root` and return its stdout; a DvcError names the command and what DVC said."""
    command = f"dvc {' '.join(args)}"
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
