"""What validation tells people: the refusal message, the reason on each rejected row, and the
summary table (reports/validation.json, and the Prefect artifact built from it)."""

from __future__ import annotations

from typing import Any

from pipelines.data.errors import MAX_REPORTED, located
from pipelines.data.expectations import ROW_TABLES, Outcome
from pipelines.data.table import Table

_UNREADABLE_FIX = {
    "jsonl": 'each line must be one UTF-8 JSON object, e.g. {"id": "1", "prompt": "...", "answer": "42"}',
    "json-array": "each item of the array must be a JSON object with the prompt and answer",
    "csv": "save the file as UTF-8 CSV whose rows have as many fields as the header (quote fields that hold commas, "
    "quotes or newlines)",
}


def reason(outcome: Outcome) -> str:
    return f"{outcome.description or 'failed'} [{outcome.describe()}]"


def row_reasons(outcomes: list[Outcome], issues: dict[int, str] | None = None) -> dict[int, list[str]]:
    """Table index -> the reasons its row breaks the row-level expectations. `issues` holds the
    task's own per-row words (its check_row), which say more than the expectation's description."""
    reasons: dict[int, list[str]] = {}
    for o in outcomes:
        if o.success or not o.row_level:
            continue
        for i in o.rows:
            text = reason(o)
            if o.column == "task_issue" and issues and issues.get(i):
                text = f"{issues[i]} [{o.describe()}]"
            reasons.setdefault(i, []).append(text)
    return reasons


def unreadable_message(table: Table, source: str) -> str:
    """One paragraph for rows that could not be read at all (bad JSON, bad bytes, bad CSV rows)."""
    bad = table.unreadable
    single = table.files[0].label if len(table.files) == 1 else None
    kinds = {table.files[u.file].kind for u in bad}
    what = "JSON objects" if kinds <= {"jsonl", "json-array"} else f"{'/'.join(sorted(k.upper() for k in kinds))} rows"
    places = located(((table.files[u.file].label, table.files[u.file].unit, u.line) for u in bad), single, natural=True)
    fixes = "; ".join(
        dict.fromkeys(
            _UNREADABLE_FIX.get(k, "each row must be a record with the mapped columns") for k in sorted(kinds)
        )
    )
    return (
        f"{source}: {len(bad)} row(s) are not valid UTF-8 {what}: {places} (first: {bad[0].problem}). "
        f"Fix: {fixes}; or set data.max_rejected_fraction above 0 to set such rows aside in "
        "data/validated/rejected.jsonl."
    )


def failure_message(
    source: str, failures: list[Outcome], table: Table, rejected: int = 0, total: int = 0, max_fraction: float = 0.0
) -> str:
    """The refusal: which expectations failed, how many rows, the first offending rows, the fix."""
    single = table.files[0].label if len(table.files) == 1 else None
    if max_fraction > 0 and rejected > max_fraction * total:
        head = (
            f"{source}: dataset refused, {rejected} of {total} row(s) ({rejected / total:.1%}) are bad, more than "
            f"data.max_rejected_fraction={max_fraction} allows; {len(failures)} expectation(s) failed:"
        )
    else:
        head = f"{source}: dataset refused, {len(failures)} expectation(s) failed:"
    parts = [head]
    if table.unreadable:
        bad = table.unreadable
        places = located(((table.files[u.file].label, table.files[u.file].unit, u.line) for u in bad), single)
        parts.append(f"  - unreadable rows: {len(bad)} row(s) at {places} (first: {bad[0].problem})")
    for f in failures:
        where = located((table.where(i) for i in f.rows), single)
        at = f" at {where}" if where else ""
        count = f.detail if f.detail and not f.rows else f"{f.unexpected_count} row(s){at}"
        meaning = f" ({f.description})" if f.description else ""
        parts.append(f"  - {f.describe()}{meaning}: {count}")
    parts.append(
        "Fix the rows named above (every row needs a unique id, a non-empty prompt of bounded length and an answer "
        "the verifier can read), or set data.max_rejected_fraction to set bad rows aside in "
        "data/validated/rejected.jsonl; "
        "then run `grpo validate` again. The full report is in reports/data-docs/index.html."
    )
    return "\n".join(parts)


def rejected_rows(table: Table, reasons: dict[int, list[str]]) -> list[dict[str, Any]]:
    """rejected.jsonl: every row set aside, with its file, line and reason, in file order."""
    keyed: list[tuple[tuple[int, int], dict[str, Any]]] = []
    for u in table.unreadable:
        source = table.files[u.file]
        keyed.append(((u.file, u.line), {"file": source.label, source.unit: u.line, "reason": u.problem, "raw": u.raw}))
    for i, why in reasons.items():
        label, unit, number = table.where(i)
        keyed.append(
            (
                (table.file[i], number),
                {"file": label, unit: number, "reason": "; ".join(why), "row": table.source_row(i)},
            )
        )
    return [row for _, row in sorted(keyed, key=lambda kv: kv[0])]


def outcome_entry(o: Outcome, table: Table) -> dict[str, Any]:
    """One expectation in reports/validation.json (the first offending rows only)."""
    first = [table.where(i) for i in o.rows[:MAX_REPORTED]]
    return {
        "table": o.table,
        "expectation": o.expectation,
        "column": o.column,
        "description": o.description,
        "success": o.success,
        "unexpected_count": o.unexpected_count,
        "lines": [n for _, _, n in first],
        "where": [f"{label}:{n}" for label, _, n in first],
        "detail": o.detail,
    }


def markdown_summary(report: dict[str, Any]) -> str:
    """The validation report as markdown: a header line and one table row per expectation.

    >>> print(markdown_summary({"source": "x.jsonl", "success": True, "rows": 3, "expectations": [
    ...     {"table": "rows", "expectation": "expect_column_values_to_be_unique", "column": "id",
    ...      "success": True, "unexpected_count": 0, "where": []}]}))
    ## Validation: passed
    <BLANKLINE>
    Source `x.jsonl`: 3 rows, 0 rejected; train ?, val ?, eval ?.
    <BLANKLINE>
    | table | expectation | column | result | bad rows | first offending rows | meaning |
    |---|---|---|---|---|---|---|
    | rows | expect_column_values_to_be_unique | id | ✅ | 0 |  |  |
    """
    status = "passed" if report.get("success") else "refused"
    lines = [
        f"## Validation: {status}",
        "",
        f"Source `{report.get('source')}`: {report.get('rows', '?')} rows, {report.get('rejected', 0)} rejected; "
        f"train {report.get('train_rows', '?')}, val {report.get('val_rows', '?')}, "
        f"eval {report.get('eval_rows', '?')}."
        + (f" Digest `{report['digest'][:16]}`." if report.get("digest") else ""),
        "",
        "| table | expectation | column | result | bad rows | first offending rows | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    if report.get("error"):
        lines[2:2] = [f"```\n{report['error']}\n```", ""]
    for e in report.get("expectations", []):
        mark = "✅" if e.get("success") else "❌"
        row_level = e.get("table") in ROW_TABLES
        where = (
            ", ".join(str(w) for w in e.get("where", []))
            if row_level
            else ("" if e.get("success") else e.get("detail", ""))
        )
        count = e.get("unexpected_count", 0) if row_level else ""
        cells = [
            e.get("table"),
            e.get("expectation"),
            e.get("column") or "",
            mark,
            count,
            where,
            e.get("description", ""),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)
