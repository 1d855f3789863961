"""The `grpo` command: one subcommand per stage, `grpo run` for the whole Prefect flow.

Stage subcommands call pipelines/ directly (that is what `dvc repro` runs); heavy libraries are
imported only inside the command that needs them, so `grpo --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.stages import STAGES


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", type=Path, default=None, help="project folder (default: nearest with params.yaml)")
    common.add_argument("--preset", default=None, help="named overrides on top of params.yaml, e.g. `smoke`")
    common.add_argument(
        "-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a param, as in `dvc exp run -S train.steps=5` (repeatable)",
    )
    parser = argparse.ArgumentParser(prog="grpo", description="GRPO post-training pipeline: validate, snapshot, train, evaluate, register.")
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "validate": "check the dataset with the Great Expectations suite and write the train/eval splits",
        "snapshot": "pin the reference model (safetensors + sha256 manifest) in models/reference",
        "train": "GRPO-train a LoRA adapter on the reference; writes models/policy",
        "evaluate": "score reference and policy on the held-out split; writes metrics/eval.json",
        "register": "log to MLflow, register the policy, move challenger/champion aliases",
    }
    for name in STAGES:
        sub.add_parser(name, parents=[common], help=helps[name], description=helps[name])
    run = sub.add_parser("run", parents=[common], help="run all five stages as a Prefect flow, versioned with DVC")
    run.add_argument("--force", action="store_true", help="rerun stages even when dvc.lock says they are up to date")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pipelines.env import quiet_telemetry

    quiet_telemetry()
    from pipelines import config
    from pipelines.data.sources import DataError
    from pipelines.paths import Paths
    from pipelines.snapshot import SnapshotError

    paths = Paths.find(args.project)
    try:
        if args.command == "run":
            from flows.pipeline import training_pipeline

            config.load(paths.params, args.overrides, args.preset)  # fail fast, before Prefect starts
            results = training_pipeline(project=str(paths.root), preset=args.preset, overrides=args.overrides, force=args.force)
            print(json.dumps(results, indent=2, default=str))
            return 0
        cfg = config.load(paths.params, args.overrides, args.preset)
        from pipelines.stages import run_stage

        result = run_stage(args.command, cfg, paths)
        print(json.dumps(result, indent=2, default=str))
        return 0
    except (config.ConfigError, DataError, SnapshotError) as exc:
        print(f"grpo {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
