"""Read user datasets into rows, with errors that name the file, the line and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_REPORTED = 5


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, the rows and the fix."""


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:MAX_REPORTED])
    more = f" and {len(numbers) - MAX_REPORTED} more" if len(numbers) > MAX_REPORTED else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each with its 1-based `_line`. Refuses the whole file on any bad line.

    A GSM8K-style `question` column is accepted where there is no `prompt`, and a missing `id`
    becomes `<file stem>-<line>`.
    """
    if not path.exists():
        raise DataError(f"{path}: file not found; set data.path to an existing JSONL file (or leave it empty to use the built-in generator)")
    rows: list[dict[str, Any]] = []
    bad_json: list[int] = []
    not_object: list[int] = []
    first_error = ""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                value = json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                bad_json.append(number)
                first_error = first_error or f"{exc}"
                continue
            if not isinstance(value, dict):
                not_object.append(number)
                continue
            row = dict(value)
            if "prompt" not in row and "question" in row:
                row["prompt"] = row["question"]
            row.setdefault("id", f"{path.stem}-{number}")
            row["_line"] = number
            rows.append(row)
    if bad_json:
        raise DataError(
            f"{path}: {len(bad_json)} row(s) are not valid UTF-8 JSON ({_lines(bad_json)}; first error: {first_error}). "
            "Fix: each line must be one JSON object, e.g. {\"id\": \"1\", \"prompt\": \"...\", \"answer\": \"42\"}."
        )
    if not_object:
        raise DataError(f"{path}: {len(not_object)} row(s) are JSON but not objects ({_lines(not_object)}). Fix: write each row as {{...}}.")
    if not rows:
        raise DataError(f"{path}: no rows. Fix: the file needs one JSON object per line with prompt (or question) and answer.")
    return rows
