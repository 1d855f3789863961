"""The one error type of the data stage, and how row locations are written in its messages."""

from __future__ import annotations

from collections.abc import Iterable

MAX_REPORTED = 5


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, the rows and the fix."""


def located(places: Iterable[tuple[str, str, int]], single: str | None, natural: bool = False) -> str:
    """Where rows are, from (file label, unit, number) triples in order: `line(s) 1, 2` when every
    row is in the file `single`, else `a.jsonl line(s) 1, 2; b.csv line(s) 4` (first few only);
    `natural` writes `line 3` / `lines 1, 2` instead of `line(s)`.

    >>> located([("x.jsonl", "line", 1), ("x.jsonl", "line", 2)], "x.jsonl")
    'line(s) 1, 2'
    >>> located([("a.jsonl", "line", 3), ("b.parquet", "row", 9), ("b.parquet", "row", 10)], None, natural=True)
    'a.jsonl line 3; b.parquet rows 9, 10'
    """
    groups: dict[tuple[str, str], list[int]] = {}
    total = 0
    for label, unit, number in places:
        total += 1
        if total <= MAX_REPORTED:
            groups.setdefault((label, unit), []).append(number)
    parts = []
    for (label, unit), numbers in groups.items():
        plural = ("s" if len(numbers) > 1 else "") if natural else "(s)"
        shown = f"{unit}{plural} {', '.join(str(n) for n in numbers)}"
        parts.append(shown if label == single else f"{label} {shown}")
    more = f" and {total - MAX_REPORTED} more" if total > MAX_REPORTED else ""
    return "; ".join(parts) + more
