"""Find the files behind `data.path` and read them into a Table, with errors that name the file,
the line and the fix.

`data.path` may be a JSONL/JSON, CSV or Parquet file, a folder of such files (read in sorted
order, recursively), a folder written by `datasets`' save_to_disk, or `hf:owner/name` (the hub).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from pipelines.config import DataConfig
from pipelines.data.errors import MAX_REPORTED, DataError
from pipelines.data.generate import generate
from pipelines.verifiers.task import Task
from pipelines.data.readers import (
    Record,
    is_hf_dataset,
    is_json_array,
    iter_csv,
    iter_hf_disk,
    iter_hf_hub,
    iter_json_array,
    iter_jsonl,
    iter_parquet,
)
from pipelines.data.table import SourceFile, Table

__all__ = ["MAX_REPORTED", "DataError", "read_source", "source_label"]

HUB_PREFIX = "hf:"
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Files a DVC/git project keeps beside data and that are not data.
_NOT_DATA = {".gitignore", ".gitkeep", ".dvcignore", ".DS_Store"}


def resolve_path(cfg: DataConfig, root: Path) -> Path:
    path = Path(cfg.path or "")
    return path if path.is_absolute() else root / path


def source_label(cfg: DataConfig, root: Path, task: str = "math") -> str:
    """How reports name the source: the path as resolved, `hf:<name>`, or `generator:<task>`."""
    if not cfg.path:
        return f"generator:{task}"
    if cfg.path.startswith(HUB_PREFIX):
        return cfg.path
    return str(resolve_path(cfg, root))


def read_source(cfg: DataConfig, root: Path, keep_raw: bool = False, task: Task | None = None) -> Table:
    """Every row of the configured source, streamed into one Table.

    Refuses (DataError) a missing path, a folder with files of unknown kinds, a source without
    rows, and a file in which no row has the mapped prompt or answer column.
    """
    table = Table(cfg.columns, keep_raw=keep_raw)
    for source, records in _sources(cfg, root, task):
        index = table.open_file(source)
        for record in records:
            table.add(index, record)
        _check_columns(table, index)
    if not len(table) and not table.unreadable:
        raise DataError(
            f"{source_label(cfg, root, task.name if task else 'math')}: no rows. Fix: the data needs one row per problem with a prompt (or question) "
            "and an answer column."
        )
    return table


def _sources(cfg: DataConfig, root: Path, task: Task | None) -> Iterator[tuple[SourceFile, Iterator[Record]]]:
    if not cfg.path:
        if task is None:
            from pipelines.verifiers.math_task import TASK as task
        label = source_label(cfg, root, task.name)
        rows = (Record(n, dict(row)) for n, row in enumerate(generate(cfg.generator, task), start=1))
        yield SourceFile(label, "row", task.name, "generator"), rows
        return
    if cfg.path.startswith(HUB_PREFIX):
        name = cfg.path[len(HUB_PREFIX) :]
        yield SourceFile(cfg.path, "row", name.rsplit("/", 1)[-1], "hub"), iter_hf_hub(name, cfg.hf)
        return
    path = resolve_path(cfg, root)
    if not path.exists():
        raise DataError(
            f"{path}: not found. Fix: set data.path to an existing file or folder (JSONL, CSV, Parquet, or a "
            "Hugging Face save_to_disk folder), or to null for the built-in generator."
        )
    if path.is_file() or is_hf_dataset(path) or cfg.format == "hf":
        yield _open(path, path.stem if path.is_file() else path.name, cfg)
        return
    files = _folder_files(path, cfg)
    if not files:
        raise DataError(
            f"{path}: the folder holds no data files. Fix: add .jsonl, .json, .csv or .parquet files, or point "
            "data.path at a file."
        )
    for file in files:
        # Ids generated for a folder keep the relative path, so a.jsonl and sub/a.jsonl never collide.
        yield _open(file, file.relative_to(path).with_suffix("").as_posix(), cfg)


def _folder_files(folder: Path, cfg: DataConfig) -> list[Path]:
    found: list[Path] = []
    unknown: list[str] = []

    def walk(directory: Path) -> None:
        for entry in sorted(directory.iterdir()):
            if entry.name.startswith(".") or entry.name in _NOT_DATA or entry.suffix == ".dvc":
                continue
            if entry.is_dir():
                if is_hf_dataset(entry):
                    found.append(entry)
                else:
                    walk(entry)
            elif cfg.format != "auto" or entry.suffix.lower() in EXTENSIONS:
                found.append(entry)
            else:
                unknown.append(str(entry.relative_to(folder)))

    walk(folder)
    if unknown:
        shown = ", ".join(unknown[:MAX_REPORTED]) + (
            f" and {len(unknown) - MAX_REPORTED} more" if len(unknown) > MAX_REPORTED else ""
        )
        # Refused, not skipped: a file the pipeline cannot read must not vanish from the dataset unnoticed.
        raise DataError(
            f"{folder}: {len(unknown)} file(s) of unknown kind ({shown}). Fix: keep only .jsonl, .json, .csv and "
            ".parquet files (or save_to_disk folders) there, or set data.format to read every file as one format."
        )
    return found


def _open(path: Path, stem: str, cfg: DataConfig) -> tuple[SourceFile, Iterator[Record]]:
    kind = cfg.format if cfg.format != "auto" else ("hf" if path.is_dir() else EXTENSIONS.get(path.suffix.lower()))
    readers: dict[str, tuple[str, Callable[[], Iterator[Record]]]] = {
        "jsonl": ("line", lambda: iter_jsonl(path)),
        "csv": ("line", lambda: iter_csv(path)),
        "parquet": ("row", lambda: iter_parquet(path)),
        "hf": ("row", lambda: iter_hf_disk(path, cfg.hf)),
    }
    if kind == "json":
        kind = "json-array" if is_json_array(path) else "jsonl"
        readers["json-array"] = ("row", lambda: iter_json_array(path))
    if kind not in readers:
        raise DataError(
            f"{path}: unknown file kind {path.suffix or '(no extension)'!r}. Fix: use .jsonl, .json, .csv or .parquet, "
            "or set data.format (jsonl, csv, parquet, hf)."
        )
    unit, reader = readers[kind]
    return SourceFile(str(path), unit, stem, kind, path), reader()


def _check_columns(table: Table, index: int) -> None:
    seen, source, cols = table.seen[index], table.files[index], table.columns
    if not seen["rows"]:
        return  # an empty file, or one whose rows are all unreadable: reported elsewhere
    found = ", ".join(table.first_columns[index][:20]) or "none"
    wanted = [
        ("prompt", cols.prompt or "prompt (or question)"),
        ("answer", cols.answer),
        *([("id", cols.id)] if cols.id else []),
    ]
    for field, column in wanted:
        if not seen[field]:
            raise DataError(
                f"{source.label}: no row has the {field} column {column!r} (columns of its first {source.unit}: "
                f"{found}). "
                f"Fix: set data.columns.{field} to the column that holds the {field}, e.g. -S "
                f"data.columns.{field}=NAME."
            )
