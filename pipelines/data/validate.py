"""Stage 1, validate: read the dataset (or generate one), run the GX suite, split, write the splits.

The order: read every row once into columns (sources.py) -> row expectations -> set bad rows
aside (only when data.max_rejected_fraction allows) -> split the rest by id into train, val and
eval -> leakage and row-count expectations -> write train/val/eval/rejected. Outputs are written atomically: a dataset
that fails leaves the previous data/validated intact.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import Config, DataConfig
from pipelines.data.checks import prompt_key, row_frame, task_rows, token_counts
from pipelines.data.errors import DataError
from pipelines.data.expectations import GxRun, Outcome, leakage_suite, rows_suite, split_suite
from pipelines.data.prompts import build_messages, question_of, task_prompt
from pipelines.data.report import failure_message, outcome_entry, rejected_rows, row_reasons, unreadable_message
from pipelines.data.sources import read_source, source_label
from pipelines.data.split import three_way
from pipelines.data.table import Table
from pipelines.hashing import digest_files
from pipelines.io import carry_over, recover_dir, replace_dir, staging_dir, write_json
from pipelines.paths import Paths
from pipelines.verifiers import catalog
from pipelines.verifiers.runner import VerifierError, run_limited
from pipelines.verifiers.task import Task, TaskError

# The splits in the order their bytes enter the dataset digest (hashing.digest_files).
SPLIT_FILES = ("train", "val", "eval")


@dataclass
class ValidationResult:
    source: str
    train_rows: int
    eval_rows: int
    digest: str
    rejected_rows: int = 0
    val_rows: int = 0


def load_task(cfg: Config, paths: Paths) -> Task:
    """The configured task, its golden cases checked in the verifier worker: a task whose judge
    and rewards disagree is refused before any data is written (DataError, every disagreement named)."""
    try:
        task = catalog.load(cfg.task, paths.root)
        catalog.check_golden(task, timeout=cfg.data.check_timeout, knob="data.check_timeout")
        catalog.with_rewards(cfg, task)  # another task's reward in train.rewards: refused now, not after training
    except TaskError as exc:
        raise DataError(str(exc)) from None
    return task


def task_issues(table: Table, frame: pd.DataFrame, task: Task, timeout: float) -> None:
    """Fill `task_issue` with the task's own check of each row (in the verifier worker, under `timeout`
    seconds a batch of 4096 rows: the check may be a user's code)."""
    if task.check_row is None:
        return
    column = frame["task_issue"].tolist()
    for indices, rows in task_rows(table, frame["answer_final"].tolist(), task):
        try:
            (issues,) = run_limited(
                [(f"check_row of task {task.name}", task.check_rows, {})], (rows,), {},
                timeout=timeout, what="verifier", knob="data.check_timeout",
            )  # fmt: skip
        except VerifierError as exc:
            raise DataError(str(exc)) from None
        for i, issue in zip(indices, issues, strict=True):
            if issue is not None:
                column[i] = issue
    frame["task_issue"] = column


def tokenizer_dir(cfg: DataConfig, paths: Paths) -> Path | None:
    """The tokenizer folder for token length bounds, when configured and present."""
    if not cfg.tokenizer:
        return None
    folder = Path(cfg.tokenizer)
    folder = folder if folder.is_absolute() else paths.root / folder
    return folder if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists() else None


def run(cfg: Config, paths: Paths) -> ValidationResult:
    data = cfg.data
    source = source_label(data, paths.root, cfg.task)
    task, table = _read(cfg, paths, source)

    tokens_from = tokenizer_dir(data, paths)
    tokens = token_counts(table, data, tokens_from, task) if tokens_from else None
    frame = row_frame(table, data, task, tokens)
    task_issues(table, frame, task, data.check_timeout)
    gx = GxRun(paths.gx_root)
    outcomes = gx.validate("rows", frame, rows_suite(data, task, "chars" if tokens is None else "tokens"))
    reasons = row_reasons(outcomes, _task_issues(frame))

    splits = _split(table, frame, data, reasons)
    outcomes += _check_splits(gx, table, data, splits, reasons)
    gx.publish(paths.data_docs)

    total = len(table) + len(table.unreadable)
    rejected = len(reasons) + len(table.unreadable)
    report = _report(source, data, task, table, outcomes, tokens_from, tokens is not None, rejected, total)
    if not report["success"]:
        # Written before raising: the report must not keep saying `success` for data just refused.
        write_json(paths.validation_report, report)
        failures = [o for o in outcomes if not o.success]
        raise DataError(failure_message(source, failures, table, rejected, total, data.max_rejected_fraction))

    digest = _write_outputs(table, frame, data, task, paths, splits, rejected_rows(table, reasons))
    counts = {f"{name}_rows": len(rows) for name, rows in splits.items()}
    report |= counts | {"digest": digest}
    write_json(paths.validation_report, report)
    return ValidationResult(source=source, digest=digest, rejected_rows=rejected, **counts)


def _read(cfg: Config, paths: Paths, source: str) -> tuple[Task, Table]:
    """The task and the dataset's rows. A refusal (DataError) is written to the validation report
    before it is raised."""
    tolerant = cfg.data.max_rejected_fraction > 0
    try:
        task = load_task(cfg, paths)
        table = read_source(cfg.data, paths.root, keep_raw=tolerant, task=task)
        if table.unreadable and not tolerant:
            raise DataError(unreadable_message(table, source))
    except DataError as exc:
        # The report must not keep saying `success` for data that was just refused.
        write_json(paths.validation_report, {"source": source, "success": False, "error": str(exc), "expectations": []})
        raise
    return task, table


def _split(table: Table, frame: pd.DataFrame, data: DataConfig, reasons: dict[int, list[str]]) -> dict[str, list[int]]:
    """Table indices of the train, val and eval splits (SPLIT_FILES order), drawn from the rows
    that passed the row expectations."""
    # Split only the rows that passed: a rejected row must not decide where its neighbours go.
    kept = [i for i in range(len(table)) if i not in reasons]
    ids = frame["id"].tolist()
    positions = three_way(
        [ids[i] for i in kept],
        data.eval_fraction,
        data.max_eval_rows,
        data.val_fraction,
        data.max_val_rows,
        data.split_seed,
    )
    return {name: [kept[p] for p in part] for name, part in zip(SPLIT_FILES, positions, strict=True)}


def _check_splits(
    gx: GxRun, table: Table, data: DataConfig, splits: dict[str, list[int]], reasons: dict[int, list[str]]
) -> list[Outcome]:
    """The leakage expectations, then each split's row count. A val or eval row whose prompt is in
    an earlier split is set aside in place: added to `reasons` and dropped from `splits`, so the
    row counts are checked on what will be written."""
    outcomes = gx.validate(
        "leakage", _leakage_frame(table, splits["train"], splits["val"], splits["eval"]), leakage_suite()
    )
    leaked = row_reasons(outcomes)
    reasons.update(leaked)
    for name in ("val", "eval"):
        splits[name] = [i for i in splits[name] if i not in leaked]
    outcomes += gx.validate("train", pd.DataFrame({"_row": splits["train"]}), split_suite("train", data.min_train_rows))
    if data.val_fraction > 0:
        outcomes += gx.validate("val", pd.DataFrame({"_row": splits["val"]}), split_suite("val", data.min_val_rows))
    outcomes += gx.validate("eval", pd.DataFrame({"_row": splits["eval"]}), split_suite("eval", data.min_eval_rows))
    return outcomes


def _report(
    source: str,
    data: DataConfig,
    task: Task,
    table: Table,
    outcomes: list[Outcome],
    tokens_from: Path | None,
    in_tokens: bool,
    rejected: int,
    total: int,
) -> dict[str, Any]:
    """The validation report before any split is written. `success` is false when a whole-table
    expectation failed or more rows were rejected than data.max_rejected_fraction allows."""
    whole_table = [o for o in outcomes if not o.success and not o.row_level]
    over = rejected > data.max_rejected_fraction * total
    report: dict[str, Any] = {
        "source": source,
        "success": not whole_table and not over,
        "rows": total,
        "rejected": rejected,
        "rejected_fraction": round(rejected / total, 6) if total else 0.0,
        "max_rejected_fraction": data.max_rejected_fraction,
        "task": task.name,
        "length_unit": "tokens" if in_tokens else "characters",
        "tokenizer": str(tokens_from) if tokens_from else None,
        "unreadable": len(table.unreadable),
        "expectations": [outcome_entry(o, table) for o in outcomes],
    }
    if data.tokenizer and not tokens_from:
        report["note"] = f"tokenizer {data.tokenizer} not found: prompt length checked in characters"
    return report


def _task_issues(frame: pd.DataFrame) -> dict[int, str]:
    bad = frame[frame["task_issue"].notna()]
    return dict(zip(bad["_row"].tolist(), bad["task_issue"].tolist(), strict=True))


def _leakage_frame(table: Table, train: list[int], val: list[int], held_out: list[int]) -> pd.DataFrame:
    """One row per val and eval row: is its prompt (normalised) also in an earlier split?

    Earlier means train for a val row, and train or val for an eval row, so no prompt is in any
    two of the three splits once the flagged rows are set aside.
    """
    # Index the (small) held-out splits and scan train against them: no set of a million train prompts.
    val_keys = [prompt_key(table.prompt[i]) for i in val]
    eval_keys = [prompt_key(table.prompt[i]) for i in held_out]
    held = set(val_keys) | set(eval_keys)
    in_train = {key for key in (prompt_key(table.prompt[i]) for i in train) if key in held}
    earlier_for_eval = in_train | set(val_keys)
    return pd.DataFrame(
        {
            "_row": val + held_out,
            "split": ["val"] * len(val) + ["eval"] * len(held_out),
            "prompt_in_train": [k in in_train for k in val_keys] + [k in earlier_for_eval for k in eval_keys],
        }
    )


def _write_outputs(
    table: Table,
    frame: pd.DataFrame,
    data: DataConfig,
    task: Task,
    paths: Paths,
    splits: dict[str, list[int]],
    rejected: list[dict[str, Any]],
) -> str:
    """Write the split files into a staging folder, then swap that whole folder in for data/validated.

    A reader sees the old set of files or the new set, never a mix (pipelines/io.py `replace_dir`).
    DVC keeps a .gitignore in data/validated: it (and anything else there the stage does not write)
    is carried into the staged folder before the swap. A crash between the swap's two renames is
    undone by the next run (pipelines/io.py `recover_dir`).
    """
    ids, finals = frame["id"].tolist(), frame["answer_final"].tolist()
    template = task_prompt(data.prompt, task)

    def rows(indices: list[int]) -> Iterable[dict[str, Any]]:
        # Built one at a time while writing: a million rows never exist twice as dicts.
        for i in indices:
            yield {
                **(table.extras[i] or {}),
                "id": ids[i],
                "prompt": build_messages(question_of(table.prompt[i], table.extras[i], task), template),
                "answer": finals[i],
            }

    staging = staging_dir(paths.validated_dir)
    try:
        for name, indices in splits.items():
            _stream_jsonl(staging / f"{name}.jsonl", rows(indices))
        _stream_jsonl(staging / "rejected.jsonl", rejected)
        digest = digest_files(*(staging / f"{name}.jsonl" for name in SPLIT_FILES))
        recover_dir(paths.validated_dir)  # an interrupted swap's old set first, so its .gitignore is carried
        carry_over(paths.validated_dir, staging)
        replace_dir(staging, paths.validated_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return digest


def _stream_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    encode = json.JSONEncoder(ensure_ascii=False).encode  # one encoder, not one per row
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(encode(row) + "\n")
