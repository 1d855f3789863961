"""The `grpo` command: one subcommand per stage, `grpo run` for the whole Prefect flow.

Stage subcommands call pipelines/ directly (that is what `dvc repro` runs); heavy libraries are
imported only inside the command that needs them, so `grpo --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.stages import STAGES

if TYPE_CHECKING:
    from pipelines.config import Config
    from pipelines.paths import Paths


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", type=Path, default=None, help="project folder (default: nearest with params.yaml)")
    common.add_argument("--preset", default=None, help="named overrides on top of params.yaml, e.g. `smoke`")
    common.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, as in `dvc exp run -S train.steps=5` (repeatable)",
    )
    parser = argparse.ArgumentParser(
        prog="grpo", description="GRPO post-training pipeline: validate, snapshot, train, evaluate, register."
    )
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
    sub.add_parser(
        "serve",
        parents=[common],
        help=(
            "serve the deployments (nightly training, retrain on new data, promotion) until Ctrl-C; needs "
            "PREFECT_API_URL"
        ),
        description="Serve this project's Prefect deployments from one process (see flows/serve.py).",
    )
    _registry_parsers(sub, common)
    _data_parsers(sub)
    return parser


REGISTRY_COMMANDS = ("models", "promote", "rollback", "ask")


def _registry_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`grpo models|promote|rollback|ask`: the registry as users see it (pipelines/registry/promotion.py, ask.py)."""
    sub.add_parser("models", parents=[common], help="list registered versions, their aliases and key metrics")
    promote = sub.add_parser("promote", parents=[common], help="make VERSION champion by hand (records who and why)")
    promote.add_argument("version", help="the version number to promote")
    promote.add_argument("--reason", required=True, help="why, recorded on the version")
    rollback = sub.add_parser("rollback", parents=[common], help="move champion back to the previous champion")
    rollback.add_argument("--reason", default="", help="why, recorded on the version rolled back")
    ask = sub.add_parser("ask", parents=[common], help="load a registered version from MLflow and answer a question")
    ask.add_argument("question", help='e.g. "What is 17 + 25?"')
    ask.add_argument("--alias", default="champion", help="which alias to load (default: champion)")
    ask.add_argument("--version", default=None, help="a version number instead of an alias")
    ask.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer length limit (default: the version's own)"
    )


def _registry_command(args: argparse.Namespace, name: str, root: Path) -> int:
    from pipelines.mlflow_store import StoreError, registry_client
    from pipelines.registry import promotion

    try:
        if args.command == "ask":
            from pipelines.registry.ask import ask

            answer = ask(
                args.question,
                root=root,
                name=name,
                alias=args.alias,
                version=args.version,
                max_new_tokens=args.max_new_tokens,
            )
            where = f"@{answer.alias} = v{answer.version}" if answer.alias else f"v{answer.version}"
            print(f"{answer.name} {where}: {answer.answer or '(empty answer: only whitespace or special tokens)'}")
            return 0
        client = registry_client(root)
        if args.command == "models":
            print(promotion.table(promotion.list_versions(client, name)))
        elif args.command == "promote":
            done = promotion.promote(client, name, args.version, args.reason)
            print(
                f"{name} v{done['champion']} is champion (was v{done['previous_champion'] or '-'}); promoted by "
                f"{done['by']}: {done['reason']}"
            )
        else:
            done = promotion.rollback(client, name, args.reason)
            print(f"{name} v{done['champion']} is champion again (v{done['rolled_back']} rolled back by {done['by']})")
        return 0
    except StoreError as exc:
        print(f"grpo {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _data_parsers(sub: argparse._SubParsersAction) -> None:
    """`grpo data add PATH`: version raw data with DVC (pipelines/data/versioning.py)."""
    data = sub.add_parser("data", help="version raw data with DVC (`grpo data add PATH`)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    add = data_sub.add_parser(
        "add", help="copy a file or folder into data/raw, `dvc add` and `dvc push` it, print its sha256"
    )
    add.add_argument("path", type=Path, help="a data file or folder (JSONL, CSV, Parquet, a save_to_disk folder)")
    add.add_argument("--project", type=Path, default=None, help="project folder (default: nearest with params.yaml)")
    add.add_argument("--no-push", action="store_true", help="version it locally only (no DVC remote needed)")


def _data_command(args: argparse.Namespace, paths: Paths) -> int:
    from dataclasses import asdict

    from pipelines.data.versioning import add_raw

    added = add_raw(paths, args.path, push=not args.no_push)
    print(json.dumps(asdict(added), indent=2))
    print(
        f"commit {added.dvc_file} (and its folder's .gitignore) with git; validate it with -S data.path={added.path}",
        file=sys.stderr,
    )
    # Only now that DVC holds it: `grpo serve` retrains on this event (pipelines/data/events.py).
    from pipelines.data.events import emit_dataset_updated

    sent = emit_dataset_updated(
        paths.root.resolve(), added.path, added.digest, dvc_file=added.dvc_file, pushed=added.pushed
    )
    print(sent.message, file=sys.stderr)
    return 0


def _serve_command(args: argparse.Namespace, paths: Paths) -> int:
    from flows.serve import ServeError, serve
    from pipelines import config

    cfg = config.load(paths.params, args.overrides, args.preset)
    # A process started in the background by a non-interactive shell inherits SIGINT as ignored,
    # and Python then never raises KeyboardInterrupt: Ctrl-C / SIGINT must always stop serve.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        serve(paths.root.resolve(), cfg, args.preset, args.overrides)
    except ServeError as exc:
        print(f"grpo serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the runner took over its own signal handling
        pass
    print("grpo serve: stopped (schedules paused until the next `grpo serve`)", file=sys.stderr)
    return 0


# The commands that talk to the MLflow server (train logs its run there); `evaluate` too when it
# re-scores the champion. Each checks first, so a server that is down costs seconds, not a scoring pass.
MLFLOW_COMMANDS = ("train", "register", "run", *REGISTRY_COMMANDS)


def _check_servers(command: str, cfg: Config, root: Path) -> None:
    """A StoreError, before any work, when a server the command needs does not answer."""
    from pipelines.mlflow_store import StoreError, check_reachable

    if command in MLFLOW_COMMANDS or (command == "evaluate" and cfg.evaluate.champion):
        check_reachable(root)
    if command == "run":
        from pipelines.data.events import api_url, prefect_problem, unreachable

        url = api_url()  # unset: Prefect starts a temporary local server itself
        problem = prefect_problem(url) if url else None
        if problem is not None:
            raise StoreError(unreachable(url, problem))


def _unreachable_line(exc: BaseException, root: Path) -> str | None:
    """The one line for an error that is a server not answering (Prefect's or MLflow's), else None."""
    from pipelines.data.events import api_url, unreachable
    from pipelines.mlflow_store import connection_failure, tracking_uri
    from pipelines.mlflow_store import unreachable as mlflow_unreachable

    reason = connection_failure(exc)
    if reason is None:
        return None
    chain, link = [], exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    if any(type(e).__module__.startswith(("httpx", "httpcore", "prefect", "websockets")) for e in chain):
        return unreachable(api_url() or "PREFECT_API_URL", reason)
    return mlflow_unreachable(tracking_uri(root), reason)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pipelines.env import quiet_telemetry
    from pipelines.mlflow_store import StoreError, bound_http_waits

    quiet_telemetry()
    bound_http_waits()  # a server that is down fails a command in seconds, not minutes (a user's setting wins)
    from pipelines import config
    from pipelines.data.sources import DataError
    from pipelines.paths import Paths
    from pipelines.snapshot.stage import SnapshotError

    paths = Paths.find(args.project)
    try:
        if args.command == "data":
            return _data_command(args, paths)
        if args.command == "serve":
            return _serve_command(args, paths)
        if args.command == "run":
            cfg = config.load(paths.params, args.overrides, args.preset)  # fail fast, before Prefect starts
            _check_servers(args.command, cfg, paths.root)
            from flows.pipeline import training_pipeline

            results = training_pipeline(
                project=str(paths.root), preset=args.preset, overrides=args.overrides, force=args.force
            )
            print(json.dumps(results, indent=2, default=str))
            return 0
        cfg = config.load(paths.params, args.overrides, args.preset)
        _check_servers(args.command, cfg, paths.root)
        if args.command in REGISTRY_COMMANDS:
            return _registry_command(args, cfg.registry.model_name, paths.root)
        from pipelines.stages import run_stage

        result = run_stage(args.command, cfg, paths)
        print(json.dumps(result, indent=2, default=str))
        return 0
    except (config.ConfigError, DataError, SnapshotError, StoreError) as exc:
        print(f"grpo {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a server lost mid-command: one line, not a library's traceback
        line = _unreachable_line(exc, paths.root)
        if line is None:
            raise
        print(f"grpo {args.command}: error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
