"""The `grpo` command: one subcommand per stage, `grpo run` for the whole Prefect flow.

Stage subcommands call pipelines/ directly (that is what `dvc repro` runs); heavy libraries are
imported only inside the command that needs them, so `grpo --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.stages import TABLE

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
    for stage in TABLE:
        sub.add_parser(stage.name, parents=[common], help=stage.does, description=stage.does)
    run = sub.add_parser("run", parents=[common], help="run all five stages as a Prefect flow, versioned with DVC")
    run.add_argument("--force", action="store_true", help="rerun stages even when dvc.lock says they are up to date")
    run.add_argument(
        "--json", action="store_true", help="print every stage's result as JSON (always in reports/run.json)"
    )
    params = sub.add_parser("params", help="params.yaml after `grpo run --preset`: `grpo params restore`")
    params_sub = params.add_subparsers(dest="params_command", required=True)
    restore = params_sub.add_parser(
        "restore", help="put back the params.yaml kept before `grpo run --preset` wrote a preset's values into it"
    )
    restore.add_argument(
        "--project", type=Path, default=None, help="project folder (default: nearest with params.yaml)"
    )
    restore.add_argument(
        "--if-preset", action="store_true", help="only when params.yaml carries a preset label; else do nothing"
    )
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
    ledger = sub.add_parser("ledger", parents=[common], help="ask the rollout ledger (ledger/): flat, history ID, top")
    ledger.add_argument("question", choices=["flat", "history", "top"])
    ledger.add_argument("prompt_id", nargs="?", help="history: the prompt's id")
    ledger.add_argument("-n", type=int, default=10, help="top: how many completions")
    return parser


REGISTRY_COMMANDS = ("models", "promote", "rollback", "ask")


def _registry_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`grpo models|promote|rollback|ask`: the registry as users see it (pipelines/registry/promotion.py, ask.py)."""
    sub.add_parser("models", parents=[common], help="list registered versions, their aliases and key metrics")
    promote = sub.add_parser(
        "promote",
        parents=[common],
        help="make VERSION champion by hand (records who and why), or register a training checkpoint and do so",
    )
    promote.add_argument("version", nargs="?", default=None, help="the version number to promote")
    promote.add_argument(
        "--checkpoint",
        default=None,
        metavar="STEP_OR_MODEL_ID",
        help="instead of VERSION: register this checkpoint of the latest training run (a step, or an MLflow "
        "model id m-...) as a new version, then make it champion (pipelines/registry/checkpoints.py)",
    )
    promote.add_argument("--reason", required=True, help="why, recorded on the version")
    rollback = sub.add_parser("rollback", parents=[common], help="move champion back to the previous champion")
    rollback.add_argument("--reason", default="", help="why, recorded on the version rolled back")
    ask = sub.add_parser(
        "ask", parents=[common], help="load a registered version from MLflow once and answer questions"
    )
    ask.add_argument("question", nargs="*", help='one or more, e.g. "What is 17 + 25?" "What is 3 * 4?"')
    ask.add_argument("--file", type=Path, default=None, help="questions, one a line (`-` reads stdin)")
    ask.add_argument("--alias", default="champion", help="which alias to load (default: champion)")
    ask.add_argument("--version", default=None, help="a version number instead of an alias")
    ask.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer length limit (default: the version's own)"
    )


def _registry_command(args: argparse.Namespace, cfg: Config, paths: Paths) -> int:
    from pipelines.mlflow_store import StoreError, redact, registry_client
    from pipelines.registry import promotion

    name, root = cfg.registry.model_name, paths.root
    try:
        if args.command == "ask":
            return _ask_command(args, name, root, cfg.runtime.device)
        if args.command == "promote" and (args.version is None) == (args.checkpoint is None):
            print("grpo promote: error: give VERSION or --checkpoint STEP_OR_MODEL_ID, one of the two", file=sys.stderr)
            return 2
        client = registry_client(root)
        if args.command == "models":
            print(promotion.table(promotion.list_versions(client, name)))
        elif args.command == "promote" and args.checkpoint is not None:
            from pipelines.registry.checkpoints import promote_checkpoint

            done = promote_checkpoint(client, cfg, paths, args.checkpoint, args.reason)
            figures = ", ".join(f"{k} {v:.3f}" for k, v in done["validation"].items()) or "no validation figures"
            print(
                f"{name} v{done['version']} registered from checkpoint step {done['step']} ({done['model_id']}, "
                f"training run {done['run_id']}; validation {figures}) and is champion (was "
                f"v{done['previous_champion'] or '-'}); promoted by {done['by']}: {done['reason']}"
            )
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
        print(f"grpo {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return 1


def _ask_command(args: argparse.Namespace, name: str, root: Path, device: str = "auto") -> int:
    """`grpo ask`: one model load for every question (arguments, then --file), the timings on stderr."""
    from pipelines.device import resolve
    from pipelines.registry.ask import ask
    from pipelines.terminal import printable

    questions = list(args.question)
    if args.file is not None:
        text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text(encoding="utf-8")
        questions += [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        print('grpo ask: error: no question; give one or more, e.g. grpo ask "What is 17 + 25?"', file=sys.stderr)
        return 2
    got = ask(
        questions,
        root=root,
        name=name,
        alias=args.alias,
        version=args.version,
        max_new_tokens=args.max_new_tokens,
        device=str(resolve(device)),
    )
    where = f"@{got.alias} = v{got.version}" if got.alias else f"v{got.version}"
    shown = [printable(a) or "(empty answer: only whitespace or special tokens)" for a in got.answers]
    if len(questions) == 1:
        print(f"{got.name} {where}: {shown[0]}")
    else:
        print(f"{got.name} {where}, {len(questions)} questions:")
        for question, answer in zip(questions, shown, strict=True):
            print(f"Q: {question}\nA: " + answer.replace("\n", "\n   "))
    print(
        f"grpo ask: loaded {got.name} v{got.version} in {got.load_s:.1f} s (base: {got.base}); answered "
        f"{len(questions)} question{'s' if len(questions) > 1 else ''} in {got.answer_s:.1f} s",
        file=sys.stderr,
    )
    return 0


def _params_command(args: argparse.Namespace, paths: Paths) -> int:
    """`grpo params restore`: the user's params.yaml back in place of a preset's (pipelines/kept_params.py)."""
    from pipelines import kept_params

    if args.if_preset and kept_params.preset_label(paths.params) is None:
        return 0
    try:
        done = kept_params.restore(paths.root)
    except kept_params.KeptParamsError as exc:
        print(f"grpo params restore: error: {exc}", file=sys.stderr)
        return 1
    where = (
        f"; the {done.preset!r} preset's file is in {done.replaced.relative_to(paths.root)}" if done.replaced else ""
    )
    print(f"grpo params restore: params.yaml is yours again (the one kept before --preset {done.preset}){where}")
    return 0


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


def _run_command(args: argparse.Namespace, paths: Paths) -> int:
    """`grpo run`: the flow, then reports/run.json, the evaluation table and the registry's decision
    (all of it as JSON with --json); and, on stderr, what to commit and, last, a loud note while
    params.yaml holds a preset's values."""
    from flows import run_report
    from flows.local_server import start_tied_to_this_process
    from flows.pipeline import training_pipeline
    from pipelines import kept_params

    left = kept_params.preset_label(paths.params)  # left by an earlier `grpo run --preset`
    if args.preset is None and left is not None:
        print(_preset_note(left, paths, before=True), file=sys.stderr)
    start_tied_to_this_process()  # no temporary Prefect server outlives this run, even a killed one
    try:
        results = training_pipeline(
            project=str(paths.root), preset=args.preset, overrides=args.overrides, force=args.force
        )
    except BaseException:
        _say_preset(paths)  # a failed run leaves the preset's values in params.yaml too
        raise
    saved = run_report.write(paths.root, results)
    print(run_report.to_json(results) if args.json else run_report.summary(paths.root, results, saved))
    sys.stdout.flush()
    if hint := run_report.commit_hint(paths.root):
        print(hint, file=sys.stderr)
    _say_preset(paths)  # last: a preset's values are not the user's to commit
    return 0


def _say_preset(paths: Paths) -> None:
    from pipelines import kept_params

    label = kept_params.preset_label(paths.params)
    if label is not None:
        print(_preset_note(label, paths, before=False), file=sys.stderr)


def _preset_note(preset: str, paths: Paths, before: bool) -> str:
    """Said loudly: params.yaml holds a preset's values (written by `grpo run --preset`), and how to go back."""
    from pipelines import kept_params

    kept = (paths.root / kept_params.KEPT).exists()
    how = (
        f"`grpo params restore` puts back your own (kept in {kept_params.KEPT}); `make demo` does so first"
        if kept
        else "no copy of your own was kept: `git checkout params.yaml` gives back the committed one"
    )
    head = "runs with" if before else "now holds"
    return f"grpo run: NOTE: params.yaml {head} the {preset!r} preset's values, not your own: {how}."


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


# Warnings libraries raise about their own internals, harmless here (category, how the message starts):
# peft asks transformers 5 for `is_gradient_checkpointing`, deprecated in favour of another name.
HARMLESS_WARNINGS = ((FutureWarning, "`is_gradient_checkpointing` is deprecated"),)


def _quiet_known_warnings() -> None:
    """Ignore HARMLESS_WARNINGS here and, through PYTHONWARNINGS, in the processes this one starts
    (`grpo serve`'s flow runs, torchrun ranks). Only the command line does this: tests see every warning."""
    for category, start in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    ours = [f"ignore:{start}:{category.__name__}" for category, start in HARMLESS_WARNINGS]
    given = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    os.environ["PYTHONWARNINGS"] = ",".join([*given, *(w for w in ours if w not in given)])


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The usage errors argparse cannot say by itself: exit 2 with the usage, as its own errors do."""
    if args.command == "ledger" and args.question == "history" and args.prompt_id is None:
        parser.error("ledger history needs the prompt's id: grpo ledger history ID (`grpo ledger top` shows ids)")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_usage(parser, args)
    if args.command == "ask":
        # Before torch loads OpenMP: threads that spin while they wait for each other made one short
        # answer take 5-15 s instead of about 1 s whenever another process held a core of a 2-core machine.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from pipelines.env import console_logging, prepare_process, project_prefect_home
    from pipelines.mlflow_store import StoreError, bound_http_waits, redact
    from pipelines.terminal import printable

    prepare_process()  # telemetry off, no progress bars in logs, before the libraries are imported
    console_logging()  # the stages' own lines (pipelines.*) on stderr
    if argv is None:  # the command line, not a test calling main()
        _quiet_known_warnings()
    bound_http_waits()  # a server that is down fails a command in seconds, not minutes (a user's setting wins)
    from pipelines import config
    from pipelines.data.sources import DataError
    from pipelines.paths import Paths
    from pipelines.snapshot.stage import SnapshotError
    from pipelines.verifiers.runner import VerifierError

    paths = Paths.find(args.project)
    try:
        if args.command == "data":
            return _data_command(args, paths)
        if args.command == "params":
            return _params_command(args, paths)
        if args.command == "ledger":  # pipelines/grpo/ledger.py
            from pipelines.grpo import ledger

            print(printable(ledger.answer(ledger.ledger_dir(paths.root), args.question, args.prompt_id, args.n)))
            return 0
        if args.command == "serve":
            return _serve_command(args, paths)
        if args.command == "run":
            cfg = config.load(paths.params, args.overrides, args.preset)  # fail fast, before Prefect starts
            # Before prefect is imported (it reads its settings then): the temporary server's runs in the
            # project, not in ~/.prefect. `serve` and `data add` need a server of the user's anyway.
            project_prefect_home(paths.root)
            _check_servers(args.command, cfg, paths.root)
            return _run_command(args, paths)
        cfg = config.load(paths.params, args.overrides, args.preset)
        _check_servers(args.command, cfg, paths.root)
        if args.command in REGISTRY_COMMANDS:
            return _registry_command(args, cfg, paths)
        from pipelines.stages import run_stage

        result = run_stage(args.command, cfg, paths)
        print(json.dumps(result, indent=2, default=str))
        return 0
    except (config.ConfigError, DataError, SnapshotError, StoreError, VerifierError) as exc:
        print(f"grpo {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:  # a server lost mid-command: one line, not a library's traceback
        line = _unreachable_line(exc, paths.root)
        if line is None:
            raise
        print(f"grpo {args.command}: error: {redact(line)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
