"""One streaming reader per file format: each yields records one at a time, never the whole file.

A record is a row as the file holds it (a dict of columns) with its 1-based line (text files) or
row number (Parquet, Hugging Face), or, when the row cannot be read, the reason and the raw text.
Whole-file problems (not a Parquet file, a broken CSV header) raise DataError with the fix.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import HubConfig
from pipelines.data.errors import DataError

BATCH_ROWS = 4096
# Raw text of an unreadable row is kept for rejected.jsonl, cut to this length (a 10 MB line of
# garbage should not be copied into every report).
MAX_RAW_CHARS = 10_000
_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass(slots=True)
class Record:
    line: int
    value: dict[str, Any] | None
    problem: str | None = None  # why the row could not be read
    raw: str | None = None  # the row's text when it could not be read


def _clip(text: str) -> str:
    return text if len(text) <= MAX_RAW_CHARS else text[:MAX_RAW_CHARS] + f"... ({len(text)} characters)"


def iter_jsonl(path: Path) -> Iterator[Record]:
    """One JSON object per line; blank lines are skipped, a byte-order mark is allowed."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                text = raw.rstrip(b"\r\n").decode("utf-8", "backslashreplace")
                yield Record(number, None, f"not valid UTF-8 (byte {exc.start + 1} of the line)", _clip(text))
                continue
            # A BOM starts the first line of files written by some Windows tools (and every part
            # of files made by concatenating them).
            text = text.removeprefix("\ufeff").rstrip("\r\n")
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Record(number, None, f"not valid JSON ({exc.msg} at column {exc.colno})", _clip(text))
                continue
            except RecursionError:
                yield Record(number, None, "not valid JSON (nested too deeply)", _clip(text))
                continue
            if not isinstance(value, dict):
                yield Record(number, None, f"a JSON {type(value).__name__}, not an object", _clip(text))
                continue
            if "\\u" in text and has_lone_surrogate(value):
                yield Record(number, None, "holds a lone surrogate escape (e.g. \\ud800): not valid Unicode text", _clip(text))
                continue
            yield Record(number, value)


def has_lone_surrogate(value: object) -> bool:
    """True when a string in `value` holds a lone UTF-16 surrogate (JSON's `\\ud800` escape decodes to
    one): it cannot be written as UTF-8, so every later stage would fail on it.

    >>> has_lone_surrogate({"a": ["ok", "\\ud800"]}), has_lone_surrogate({"a": "\\u00e9"})
    (True, False)
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_lone_surrogate(v) for v in value)
    return False


def is_json_array(path: Path) -> bool:
    """True when a .json file holds one array rather than JSON lines."""
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def iter_json_array(path: Path) -> Iterator[Record]:
    """A file holding one JSON array of objects; rows are numbered by position (1-based).

    The array is parsed whole (JSON arrays cannot be streamed with the standard library): use
    JSONL for large files.
    """
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(
            f"{path}: not a valid JSON array ({exc}). Fix: write the file as JSON lines (one object per line, "
            "extension .jsonl) or as one valid array of objects."
        ) from None
    for number, value in enumerate(items, start=1):
        if isinstance(value, dict):
            yield Record(number, value)
        else:
            yield Record(number, None, f"a JSON {type(value).__name__}, not an object", _clip(json.dumps(value)))


def iter_csv(path: Path) -> Iterator[Record]:
    """A CSV file with a header row. Cells holding a JSON list or object (chat messages, countdown
    numbers) are read as that value; every other cell is text."""
    # csv's default field limit (128 KiB) would refuse a long prompt as a format error.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    # surrogateescape: a bad byte refuses its own row (found below), not the whole file.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                return
            _check_header(path, header)
            while True:
                start = reader.line_num + 1
                fields = next(reader, None)
                if fields is None:
                    return
                if not any(f.strip() for f in fields):
                    continue
                joined = ",".join(fields)
                if _SURROGATE.search(joined):
                    bad = joined.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                    yield Record(start, None, "not valid UTF-8", _clip(bad))
                elif len(fields) != len(header):
                    yield Record(start, None, f"{len(fields)} fields where the header has {len(header)}", _clip(joined))
                else:
                    yield Record(start, {name: _cell(v) for name, v in zip(header, fields, strict=True)})
        except csv.Error as exc:
            raise DataError(
                f"{path}: not valid CSV at line {reader.line_num} ({exc}). Fix: save the file as UTF-8 CSV with a "
                "header row and quoted fields."
            ) from None


def _check_header(path: Path, header: list[str]) -> None:
    names = [h.strip() for h in header]
    if _SURROGATE.search("".join(names)):
        raise DataError(f"{path}: the header row is not valid UTF-8. Fix: save the file as UTF-8 CSV.")
    missing = [i + 1 for i, n in enumerate(names) if not n]
    dupes = sorted({n for n in names if n and names.count(n) > 1})
    if missing or dupes:
        what = f"unnamed column(s) {missing}" if missing else f"repeated column name(s) {dupes}"
        raise DataError(f"{path}: the header row (line 1) has {what}. Fix: give every column a distinct name.")
    header[:] = names


def _cell(text: str) -> Any:
    stripped = text.strip()
    if stripped[:1] in ("[", "{") and stripped[-1:] in ("]", "}"):
        try:
            return json.loads(stripped)
        except (json.JSONDecodeError, RecursionError):
            return text
    return text


def iter_parquet(path: Path) -> Iterator[Record]:
    """A Parquet file, read in record batches; rows are numbered from 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        number = 0
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
            for value in batch.to_pylist():
                number += 1
                yield Record(number, value)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{path}: not a readable Parquet file ({exc}). Fix: write it again, e.g. with pandas' to_parquet."
        ) from None


def is_hf_dataset(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def iter_hf_disk(path: Path, hub: HubConfig) -> Iterator[Record]:
    """A dataset saved with `save_to_disk`, read from its memory-mapped Arrow files in batches."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise DataError(
            f"{path}: not a readable Hugging Face dataset folder ({type(exc).__name__}: {exc}). Fix: save it again "
            "with save_to_disk."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[_pick_split(str(path), list(loaded), hub.split)]
    yield from _iter_hf(loaded)


def iter_hf_hub(name: str, hub: HubConfig) -> Iterator[Record]:
    """A dataset on the Hugging Face hub, streamed (needs the network)."""
    import datasets

    try:
        stream = datasets.load_dataset(
            name, hub.subset, split=hub.split or "train", revision=hub.revision, streaming=True
        )
        for number, value in enumerate(stream, start=1):
            yield Record(number, dict(value))
    except Exception as exc:  # network, authentication, unknown name or split: all need the same advice
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(
            f"hf:{name}: cannot read it from the Hugging Face hub ({type(exc).__name__}: {reason[:300]}). Fix: check "
            "the "
            "name, data.hf.subset and data.hf.split; without network access (HF_HUB_OFFLINE), save it where the "
            "network "
            "is with `datasets.load_dataset(...).save_to_disk(FOLDER)` and set data.path to that folder."
        ) from None


def _iter_hf(dataset: Any) -> Iterator[Record]:
    number = 0
    for batch in dataset.with_format("arrow").iter(batch_size=BATCH_ROWS):
        for value in batch.to_pylist():
            number += 1
            yield Record(number, value)


def _pick_split(where: str, splits: list[str], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in splits:
            raise DataError(
                f"{where}: no split {wanted!r}; it has {', '.join(splits)}. Fix: set data.hf.split to one of them."
            )
        return wanted
    if len(splits) == 1:
        return splits[0]
    raise DataError(
        f"{where}: the dataset has splits {', '.join(splits)}. Fix: choose one with data.hf.split (e.g. -S "
        f"data.hf.split={splits[0]})."
    )
