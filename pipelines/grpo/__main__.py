"""Entry point of each rank that grpo/launcher.py starts: `python -m pipelines.grpo --project ...`."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

from pipelines.config import Config
from pipelines.paths import Paths


def main(argv: list[str] | None = None) -> int:
    """Entry point of each rank that `launch` starts."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.grpo")
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True, help="the resolved Config as JSON")
    parser.add_argument("--result", type=Path, required=True, help="where rank 0 writes the TrainResult")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)

    from pipelines.env import console_logging, prepare_process
    from pipelines.grpo import trainer
    from pipelines.io import write_json

    prepare_process()
    console_logging()  # rank 0's progress lines on stderr, as in one process
    cfg = Config.model_validate_json(args.config.read_text(encoding="utf-8"))
    result = trainer.run(cfg, Paths(args.project), log_to_mlflow=not args.no_mlflow)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(args.result, asdict(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
