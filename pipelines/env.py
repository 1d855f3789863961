"""Process environment the product sets before it starts work (never at import time)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Telemetry off by default, so that nothing reaches the internet; a user's own setting wins.
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    # MLflow writes "View run ... at: <tracking URI>" to stdout itself: with a server that URI can hold
    # a password, and it would start `grpo run --json`'s output. The Prefect run links to the run instead.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def set_threads(num_threads: int) -> None:
    """torch's thread count (`runtime.num_threads`); 0 keeps torch's default."""
    import torch

    if num_threads > 0:
        torch.set_num_threads(num_threads)


def quiet_telemetry() -> None:
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)


# The embedded default's Prefect state (the temporary server's SQLite database of runs, logs and
# artifacts, and results storage) in the project rather than ~/.prefect, which every project on the
# machine shares: one project's runs and keyed artifacts are not shown beside another's.
PREFECT_STATE = Path(".grpo") / "prefect"


def project_prefect_home(root: Path) -> Path | None:
    """PREFECT_HOME = <root>/.grpo/prefect, unless the user set PREFECT_HOME or PREFECT_API_URL (None then).

    Prefect reads its settings once, when it is imported: call this before. The user's profiles
    (~/.prefect/profiles.toml) are still read, so a server named there is still the one used.
    """
    if os.environ.get("PREFECT_HOME") or os.environ.get("PREFECT_API_URL"):
        return None
    home = (root / PREFECT_STATE).resolve()
    home.mkdir(parents=True, exist_ok=True)
    profiles = Path.home() / ".prefect" / "profiles.toml"
    if profiles.exists():
        os.environ.setdefault("PREFECT_PROFILES_PATH", str(profiles))
    os.environ["PREFECT_HOME"] = str(home)
    return home


# Libraries' own progress bars (transformers' "Loading weights" and GGUF conversion, hub and datasets
# downloads, MLflow's artifact transfers): fine on a terminal, lines of thousands of characters in a log or a pipe.
PROGRESS_BARS_OFF = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Every other tqdm bar's default (tqdm >= 4.66 reads TQDM_* variables): transformers' GGUF loader
    # draws "Converting and de-quantizing GGUF tensors" with a bare tqdm, which no HF_* switch reaches.
    "TQDM_DISABLE": "1",
}


def prepare_process() -> None:
    """The one place every entry point sets the process environment: `grpo` (and so `dvc repro`), each
    training rank, and a stage run by a Prefect worker (pipelines/stages.run_stage). Telemetry off and
    no progress bars in logs; a user's own settings win. Call before the libraries are imported."""
    quiet_telemetry()
    quiet_progress_bars()


def quiet_progress_bars() -> None:
    """No library progress bars when stderr is not a terminal (before those libraries are imported);
    a user's own setting wins."""
    if not sys.stderr.isatty():
        for key, value in PROGRESS_BARS_OFF.items():
            os.environ.setdefault(key, value)


# As Prefect's console lines look, so that both read as one log.
FORMAT = "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s"


def console_logging(level: int = logging.INFO) -> None:
    """The domain code's log lines (the `pipelines.*` loggers) on stderr, one line each.

    They stop here rather than propagating to the root logger, so a driver that also sends them
    elsewhere (the Prefect task, tasks/logs.py) shows each once on the console.
    """
    logger = logging.getLogger("pipelines")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class _Stderr(logging.StreamHandler):
    """A stream handler on whatever sys.stderr is when a record comes (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass
