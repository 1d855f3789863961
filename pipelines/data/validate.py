"""Stage 1, validate: read the dataset (or generate one), run the GX suite, split, write the splits.

Outputs are written atomically: a dataset that fails leaves the previous data/validated intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import Config
from pipelines.data.expectations import Outcome, rows_suite, split_suite, validate_frames
from pipelines.data.generate import arithmetic
from pipelines.data.prompts import build_messages, prompt_text
from pipelines.data.sources import MAX_REPORTED, DataError, read_jsonl
from pipelines.data.split import split_rows
from pipelines.io import staging_dir, write_json, write_jsonl
from pipelines.paths import Paths
from pipelines.verifiers.math_answer import reference_answer


@dataclass
class ValidationResult:
    source: str
    train_rows: int
    eval_rows: int
    digest: str


def load_rows(cfg: Config, paths: Paths) -> tuple[str, list[dict[str, Any]]]:
    if cfg.data.path:
        path = Path(cfg.data.path)
        path = path if path.is_absolute() else paths.root / path
        return str(path), read_jsonl(path)
    rows = [dict(r, _line=i) for i, r in enumerate(arithmetic(cfg.data.generator), start=1)]
    return "generator:arithmetic", rows


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    def kind(p: Any) -> str:
        if isinstance(p, str):
            return "text"
        if isinstance(p, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
            return "messages"
        return type(p).__name__

    def text_or_none(v: Any) -> str | None:
        if v is None or (isinstance(v, float) and v != v):
            return None
        text = str(v).strip()
        return text or None

    return pd.DataFrame(
        {
            "_line": [r["_line"] for r in rows],
            "id": [text_or_none(r.get("id")) for r in rows],
            "prompt_kind": [kind(r.get("prompt")) for r in rows],
            "prompt_text": [text_or_none(prompt_text(r.get("prompt"))) for r in rows],
            "answer": [text_or_none(r.get("answer")) for r in rows],
            "answer_final": [reference_answer(str(r["answer"])) if text_or_none(r.get("answer")) else "" for r in rows],
        }
    )


def failure_message(source: str, failures: list[Outcome]) -> str:
    parts = [f"{source}: dataset refused, {len(failures)} expectation(s) failed:"]
    for f in failures:
        lines = ", ".join(str(n) for n in f.lines[:MAX_REPORTED])
        more = f" and {len(f.lines) - MAX_REPORTED} more" if len(f.lines) > MAX_REPORTED else ""
        at = f" at line(s) {lines}{more}" if lines else ""
        count = f.detail if f.detail and not f.lines else f"{f.unexpected_count} row(s){at}"
        parts.append(f"  - {f.describe()}: {count}")
    parts.append(
        "Fix the rows named above (every row needs a unique id, a non-empty prompt and a numeric answer), "
        "then run `grpo validate` again; see reports/data-docs/index.html for the full report."
    )
    return "\n".join(parts)


def digest_files(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def run(cfg: Config, paths: Paths) -> ValidationResult:
    source, rows = load_rows(cfg, paths)
    frame = to_frame(rows)
    prompt_cfg = cfg.data.prompt
    validated = [
        {
            **{k: v for k, v in r.items() if k not in {"prompt", "question", "answer", "_line", "id"}},
            "id": str(r["id"]),
            "prompt": build_messages(r["prompt"], prompt_cfg),
            "answer": reference_answer(str(r["answer"])),
            "_line": r["_line"],
        }
        for r in rows
        if isinstance(r.get("prompt"), (str, list)) and r.get("answer") is not None
    ]
    train, evaluation = split_rows(validated, cfg.data.eval_fraction, cfg.data.max_eval_rows, cfg.data.split_seed)
    frames = {
        "rows": (frame, rows_suite(cfg.data)),
        "train": (pd.DataFrame({"_line": [r["_line"] for r in train]}), split_suite("train", cfg.data.min_train_rows)),
        "eval": (pd.DataFrame({"_line": [r["_line"] for r in evaluation]}), split_suite("eval", cfg.data.min_eval_rows)),
    }
    outcomes = validate_frames(frames, paths.gx_root, paths.data_docs)
    failures = [o for o in outcomes if not o.success]
    report: dict[str, Any] = {
        "source": source,
        "success": not failures,
        "rows": len(rows),
        "expectations": [o.__dict__ | {"lines": o.lines[:MAX_REPORTED]} for o in outcomes],
    }
    if failures:
        write_json(paths.validation_report, report)
        raise DataError(failure_message(source, failures))

    staging = staging_dir(paths.validated_dir)
    try:
        write_jsonl(staging / "train.jsonl", [_public(r) for r in train])
        write_jsonl(staging / "eval.jsonl", [_public(r) for r in evaluation])
        write_jsonl(staging / "rejected.jsonl", [])
        digest = digest_files(staging / "train.jsonl", staging / "eval.jsonl")
        # File by file, not a folder swap: data/validated also holds DVC's .gitignore.
        paths.validated_dir.mkdir(parents=True, exist_ok=True)
        for name in ("train.jsonl", "eval.jsonl", "rejected.jsonl"):
            os.replace(staging / name, paths.validated_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report |= {"train_rows": len(train), "eval_rows": len(evaluation), "digest": digest}
    write_json(paths.validation_report, report)
    return ValidationResult(source=source, train_rows=len(train), eval_rows=len(evaluation), digest=digest)


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "_line"}
