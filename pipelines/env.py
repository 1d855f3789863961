"""Process environment the product sets before it starts work (never at import time)."""

from __future__ import annotations

import os

# Telemetry off by default (ENVIRONMENT.md lists the switches); a user's own setting wins.
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_telemetry() -> None:
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
