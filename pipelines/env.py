"""Process environment the product sets before it starts work (never at import time)."""

from __future__ import annotations

import os

# Telemetry off by default, so that nothing reaches the internet; a user's own setting wins.
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def set_threads(num_threads: int) -> None:
    """torch's thread count (`runtime.num_threads`); 0 keeps torch's default."""
    import torch

    if num_threads > 0:
        torch.set_num_threads(num_threads)


def quiet_telemetry() -> None:
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
