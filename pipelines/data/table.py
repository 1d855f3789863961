"""A dataset held in columns: id, prompt, answer, extra columns, and where each row came from.

One list per field instead of one dict per row, so a million-row file costs a few list entries
per row, read once; the GX frame, the split and the output files all index into these lists.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import ColumnsConfig
from pipelines.data.readers import Record

# Columns the auto prompt mapping reads (`prompt`, else GSM8K's `question`): neither is an extra column.
AUTO_PROMPT = ("prompt", "question")


@dataclass(frozen=True)
class SourceFile:
    label: str  # how messages name it: the path, or `generator:<task>`, or `hf:<name>`
    unit: str  # `line` for text files, `row` for Parquet, Hugging Face and generators
    stem: str  # the prefix of generated ids: `<stem>-<line>`
    kind: str = "jsonl"  # jsonl, json-array, csv, parquet, hf, hub, generator
    path: Path | None = None


@dataclass(frozen=True)
class Unreadable:
    file: int
    line: int
    problem: str
    raw: str | None


class Table:
    """Rows read from one or more files, mapped to id / prompt / answer by `data.columns`."""

    def __init__(self, columns: ColumnsConfig, keep_raw: bool = False) -> None:
        self.columns = columns
        self.keep_raw = keep_raw  # raw text of unreadable rows, only when they go to rejected.jsonl
        self.files: list[SourceFile] = []
        self.file = array("i")
        self.line = array("q")
        self.id: list[Any] = []
        self.prompt: list[Any] = []
        self.answer: list[Any] = []
        self.extras: list[dict[str, Any] | None] = []
        self.unreadable: list[Unreadable] = []
        # Per file: rows read, and rows holding the prompt / answer / id column (schema check).
        self.seen: list[dict[str, int]] = []
        self.first_columns: list[list[str]] = []
        self._used_cache: dict[str, frozenset[str]] = {}

    def __len__(self) -> int:
        return len(self.id)

    def open_file(self, source: SourceFile) -> int:
        self.files.append(source)
        self.seen.append({"rows": 0, "prompt": 0, "answer": 0, "id": 0})
        self.first_columns.append([])
        return len(self.files) - 1

    def add(self, index: int, record: Record) -> None:
        if record.value is None:
            self.unreadable.append(
                Unreadable(index, record.line, record.problem or "unreadable", record.raw if self.keep_raw else None)
            )
            return
        value, cols, seen = record.value, self.columns, self.seen[index]
        if not seen["rows"]:
            self.first_columns[index] = [str(k) for k in value]
        seen["rows"] += 1
        prompt_key = cols.prompt or next((k for k in AUTO_PROMPT if k in value), AUTO_PROMPT[0])
        id_key = cols.id or "id"
        seen["prompt"] += prompt_key in value
        seen["answer"] += cols.answer in value
        seen["id"] += id_key in value
        if id_key in value:
            row_id = value[id_key]
        elif cols.id is None:
            row_id = f"{self.files[index].stem}-{record.line}"
        else:
            row_id = None
        extra_keys = value.keys() - self._used(prompt_key)
        extras = {str(k): jsonable(value[k]) for k in value if k in extra_keys} if extra_keys else None
        self.file.append(index)
        self.line.append(record.line)
        self.id.append(row_id)
        self.prompt.append(value.get(prompt_key))
        self.answer.append(value.get(cols.answer))
        self.extras.append(extras)

    def _used(self, prompt_key: str) -> frozenset[str]:
        """The mapped columns (not extras) for rows whose prompt is in `prompt_key`; cached."""
        used = self._used_cache.get(prompt_key)
        if used is None:
            cols = self.columns
            used = frozenset({prompt_key, cols.answer, cols.id or "id", *(AUTO_PROMPT if cols.prompt is None else ())})
            self._used_cache[prompt_key] = used
        return used

    def where(self, i: int) -> tuple[str, str, int]:
        """(file label, unit, number) of row `i`."""
        source = self.files[self.file[i]]
        return source.label, source.unit, self.line[i]

    def source_row(self, i: int) -> dict[str, Any]:
        """Row `i` as read (mapped names), for rejected.jsonl."""
        return {
            "id": jsonable(self.id[i]),
            "prompt": jsonable(self.prompt[i]),
            "answer": jsonable(self.answer[i]),
            **(self.extras[i] or {}),
        }


def jsonable(value: Any) -> Any:
    """A value JSON can hold: NaN and infinities become null, unknown types (dates, bytes) text.

    >>> jsonable({"a": float("nan"), "b": [1, b"x"]})
    {'a': None, 'b': [1, "b'x'"]}
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)
