"""Issue 4: a corpus of malformed files. Each is either accepted correctly or refused with one
paragraph naming the file, the rows and the fix, as a DataError (`grpo validate` exit code 1, no
traceback)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from flows.cli import main
from pipelines import config
from pipelines.data import validate
from pipelines.data.sources import DataError
from pipelines.paths import Paths
from tests.conftest import cli_env

TEN_MB = 10 * 1024 * 1024
MAX_MESSAGE = 3000  # a refusal is a paragraph, never a dump of the data


def _good(n: int = 20, start: int = 0) -> list[str]:
    return [
        json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i)})
        for i in range(start, start + n)
    ]


def _lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def invalid_json(p: Path) -> None:
    _lines(p, [*_good(3), '{"id": "x", "prompt": "What?", "answer": "1"', *_good(20, 10)])


def byte_order_mark(p: Path) -> None:
    p.write_bytes(b"\xef\xbb\xbf" + ("\n".join(_good()) + "\n").encode())


def byte_order_mark_csv(p: Path) -> None:
    rows = ["id,prompt,answer", *[f"q{i},What is {i} + {i}?,{2 * i}" for i in range(20)]]
    p.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(rows) + "\r\n").encode())


def non_utf8(p: Path) -> None:
    good = [line.encode() for line in _good()]
    p.write_bytes(b"\n".join([*good[:4], b'{"id": "bad", "prompt": "caf\xe9 \xff", "answer": "1"}', *good[4:]]) + b"\n")


def non_utf8_csv(p: Path) -> None:
    rows = [b"id,prompt,answer", *[f"q{i},What is {i} + {i}?,{2 * i}".encode() for i in range(20)]]
    rows.insert(3, b"bad,caf\xe9?,1")
    p.write_bytes(b"\n".join(rows) + b"\n")


def missing_columns(p: Path) -> None:
    _lines(p, [json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {i}?"}) for i in range(20)])


def wrong_types(p: Path) -> None:
    bad = [
        json.dumps({"id": "a", "prompt": 5, "answer": "1"}),
        json.dumps({"id": ["b"], "prompt": "What is 1 + 1?", "answer": "2"}),
        json.dumps({"id": "c", "prompt": "What is 1 + 2?", "answer": {"value": 3}}),
        json.dumps({"id": "d", "prompt": [{"role": "user"}], "answer": "4"}),
        json.dumps({"id": "e", "prompt": "What is 2 + 3?", "answer": True}),
    ]
    _lines(p, [*_good(), *bad])


def nan_and_empty(p: Path) -> None:
    bad = [
        '{"id": "n1", "prompt": "What is 1 + 1?", "answer": NaN}',
        '{"id": "n2", "prompt": "", "answer": "2"}',
        '{"id": "   ", "prompt": "What is 2 + 2?", "answer": "4"}',
        '{"id": "n4", "prompt": "What is 3 + 3?", "answer": "   "}',
        '{"id": "n5", "prompt": "What is 4 + 4?", "answer": Infinity}',
    ]
    _lines(p, [*_good(), *bad])


def duplicated_ids(p: Path) -> None:
    _lines(p, [*_good(), json.dumps({"id": "q3", "prompt": "What is 9 + 9?", "answer": "18"})])


def empty_file(p: Path) -> None:
    p.write_bytes(b"")


def blank_lines_only(p: Path) -> None:
    p.write_text("\n  \n\r\n")


def ten_mb_prompt(p: Path) -> None:
    huge = json.dumps({"id": "huge", "prompt": "What is " + "1 + " * (TEN_MB // 4) + "1?", "answer": "1"})
    _lines(p, [*_good(), huge])


def ten_mb_garbage_line(p: Path) -> None:
    _lines(p, [*_good(), "{" + "x" * TEN_MB])


def deeply_nested(p: Path) -> None:
    _lines(p, [*_good(), '{"id": "deep", "prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "1"}'])


def not_objects(p: Path) -> None:
    _lines(p, [*_good(), "[1, 2, 3]", '"just a string"'])


def ragged_csv(p: Path) -> None:
    rows = ["id,prompt,answer", *[f"q{i},What is {i} + {i}?,{2 * i}" for i in range(20)], "x,What is 1 + 1?,2,extra"]
    p.write_text("\n".join(rows) + "\n")


def unclosed_quote_csv(p: Path) -> None:
    rows = ["id,prompt,answer", *[f"q{i},What is {i} + {i}?,{2 * i}" for i in range(20)]]
    rows.insert(6, 'x,"What is 1 + 1?,2')  # the quote swallows the rest of the file into one field
    p.write_text("\n".join(rows) + "\n")


def fake_parquet(p: Path) -> None:
    p.write_bytes(b"PAR1 this is not really parquet")


def answers_as_numbers(p: Path) -> None:
    _lines(p, [json.dumps({"id": i, "prompt": f"What is {i} + 0.5?", "answer": i + 0.5}) for i in range(20)])


# name: (file name, writer, None when accepted / the substrings a refusal must contain)
CORPUS: dict[str, tuple[str, Callable[[Path], None], list[str] | None]] = {
    "invalid_json": (
        "bad.jsonl",
        invalid_json,
        ["1 row(s) are not valid UTF-8 JSON", "line 4", "not valid JSON", "Fix:"],
    ),
    "byte_order_mark": ("bom.jsonl", byte_order_mark, None),
    "byte_order_mark_csv": ("bom.csv", byte_order_mark_csv, None),
    "non_utf8": ("latin1.jsonl", non_utf8, ["not valid UTF-8", "line 5", "Fix:"]),
    "non_utf8_csv": ("latin1.csv", non_utf8_csv, ["not valid UTF-8 CSV rows", "line 4", "Fix:"]),
    "missing_columns": (
        "noanswer.jsonl",
        missing_columns,
        ["no row has the answer column 'answer'", "id, prompt", "data.columns.answer"],
    ),
    "wrong_types": (
        "types.jsonl",
        wrong_types,
        [
            "expect_column_values_to_be_in_set(prompt_kind)",
            "expect_column_values_to_be_in_set(id_type)",
            "expect_column_values_to_be_in_set(answer_type)",
            "line(s) 21, 24",  # prompt 5, and a message without content
            "line(s) 22",
            "line(s) 23, 25",  # a dict and a boolean answer
        ],
    ),
    "nan_and_empty": (
        "nan.jsonl",
        nan_and_empty,
        [
            "expect_column_values_to_not_be_null(answer)",
            "3 row(s) at line(s) 21, 24, 25",
            "expect_column_values_to_not_be_null(prompt_text)",
            "line(s) 22",
            "expect_column_values_to_not_be_null(id)",
            "line(s) 23",
        ],
    ),
    "duplicated_ids": ("dupes.jsonl", duplicated_ids, ["expect_column_values_to_be_unique(id)", "line(s) 4, 21"]),
    "empty_file": ("empty.jsonl", empty_file, ["no rows", "Fix:"]),
    "blank_lines_only": ("blank.jsonl", blank_lines_only, ["no rows", "Fix:"]),
    "ten_mb_prompt": (
        "huge.jsonl",
        ten_mb_prompt,
        ["expect_column_values_to_be_between(prompt_chars)", "line(s) 21", "data.min/max_prompt_chars"],
    ),
    "ten_mb_garbage_line": ("garbage.jsonl", ten_mb_garbage_line, ["not valid JSON", "line 21"]),
    "deeply_nested": ("deep.jsonl", deeply_nested, ["nested too deeply", "line 21"]),
    "not_objects": ("arrays.jsonl", not_objects, ["2 row(s)", "lines 21, 22", "not an object"]),
    "ragged_csv": ("ragged.csv", ragged_csv, ["4 fields where the header has 3", "line 22"]),
    "unclosed_quote_csv": ("quote.csv", unclosed_quote_csv, ["2 fields where the header has 3", "line 7", "Fix:"]),
    "fake_parquet": ("fake.parquet", fake_parquet, ["not a readable Parquet file", "Fix:"]),
    "answers_as_numbers": ("numbers.jsonl", answers_as_numbers, None),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_corpus_file_is_accepted_or_refused_clearly(project, case):
    name, write, expected = CORPUS[case]
    path = project / "data" / "raw" / name
    write(path)
    cfg = config.load(project / "params.yaml", [f"data.path={path}"], preset="smoke")
    paths = Paths(project)
    if expected is None:
        result = validate.run(cfg, paths)
        rows = [
            json.loads(line)
            for f in (paths.train_split, paths.val_split, paths.eval_split)
            for line in f.read_text(encoding="utf-8").splitlines()
        ]
        assert len(rows) == result.train_rows + result.val_rows + result.eval_rows == 20
        assert all(
            r["answer"] and r["prompt"][-1]["content"].startswith("What is") for r in rows
        )  # no BOM left in a value
        return
    with pytest.raises(DataError) as err:
        validate.run(cfg, paths)
    message = str(err.value)
    assert message.startswith(str(path)), message[:300]
    for part in expected:
        assert part in message, f"{part!r} not in {message[:1500]!r}"
    assert len(message) < MAX_MESSAGE and "Traceback" not in message
    assert not paths.train_split.exists()  # nothing half-written


@pytest.mark.parametrize("case", ["invalid_json", "nan_and_empty", "empty_file", "fake_parquet"])
def test_cli_refuses_with_exit_code_1_and_no_traceback(project, case, capsys):
    name, write, expected = CORPUS[case]
    path = project / name
    write(path)
    code = main(["validate", "--project", str(project), "--preset", "smoke", "-S", f"data.path={path}"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"grpo validate: error: {path}") and "Traceback" not in err and expected[0] in err


def test_cli_process_exit_code_on_non_utf8(project):
    path = project / "latin1.jsonl"
    non_utf8(path)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", "--preset", "smoke", "-S", f"data.path={path}"],
        cwd=project,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "not valid UTF-8" in proc.stderr and "line 5" in proc.stderr and "Traceback" not in proc.stderr


def test_tolerated_corpus_rows_are_set_aside_with_their_raw_text(project):
    path = project / "mixed.jsonl"
    good = _good(40)
    path.write_bytes(
        ("\n".join(good[:10]) + "\n").encode()
        + b'{"id": "x", "prompt": "\xff"}\n{oops\n'
        + ("\n".join(good[10:]) + "\n").encode()
    )
    cfg = config.load(project / "params.yaml", [f"data.path={path}", "data.max_rejected_fraction=0.1"], preset="smoke")
    result = validate.run(cfg, Paths(project))
    rejected = [json.loads(line) for line in Paths(project).rejected.read_text(encoding="utf-8").splitlines()]
    assert result.train_rows + result.val_rows + result.eval_rows == 40 and result.rejected_rows == 2
    assert [(r["line"], r["raw"]) for r in rejected] == [(11, '{"id": "x", "prompt": "\\xff"}'), (12, "{oops")]


def _million_rows(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(f'{{"id": "r{i}", "prompt": "What is {i} + 1?", "answer": "{i + 1}"}}\n')


def test_a_larger_file_streams_through(project):
    path = project / "many.jsonl"
    _million_rows(path, 50_000)
    result = validate.run(config.load(project / "params.yaml", [f"data.path={path}"], preset="smoke"), Paths(project))
    assert result.train_rows + result.val_rows + result.eval_rows == 50_000 and result.eval_rows == 8


@pytest.mark.slow
def test_a_million_row_file_is_read_once(project):
    """About 25 s here. Peak memory is bounded: the rows are held once, in columns (a dict per row
    read into a list and then copied into validated rows would need roughly twice this)."""
    path = project / "million.jsonl"
    _million_rows(path, 1_000_000)
    script = (
        "import json, resource, sys; from pathlib import Path; from pipelines import config; "
        "from pipelines.data import validate; from pipelines.paths import Paths; "
        f"root = Path({str(project)!r}); "
        f"cfg = config.load(root / 'params.yaml', ['data.path={path}', 'data.prompt.examples=[]']); "
        "r = validate.run(cfg, Paths(root)); "
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
        "print(json.dumps({'rows': r.train_rows + r.val_rows + r.eval_rows, 'rss_mb': rss}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rows"] == 1_000_000
    assert out["rss_mb"] < 1600, out


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("__import__('os').system('echo pwned')", "unexpected character '_'"),
        ("2 ** 10", "unexpected '*'"),
        ("-3 + 10", "unexpected '-'"),
        ("3 + 4 7", "unexpected 7 after a complete expression"),
        ("(3 + 4", "unbalanced parentheses"),
        ("7 / (4 - 4)", "division by zero"),
        ("3 * 3 + 4", "uses 3 more often than given"),
        ("1e3", "unexpected character 'e'"),
        ("(" * 40 + "3" + ")" * 40, "nested deeper than 32"),
        ("3 + " * 200 + "3", "longer than 256 characters"),
        ("", "empty expression"),
    ],
)
def test_countdown_checker_refuses_hostile_model_output(expression, why):
    """Model output is untrusted too: the countdown checker parses it and never runs it."""
    from pipelines.verifiers.countdown import ExpressionError, check_expression, solves

    with pytest.raises(ExpressionError, match=re.escape(why)):
        check_expression(expression, [3, 4, 7])
    assert solves(expression, [3, 4, 7], 7) is False


def test_countdown_checker_exact_arithmetic():
    from fractions import Fraction

    from pipelines.verifiers.countdown import check_expression, solves

    assert check_expression("7 / 3 * 3", [3, 3, 7]).value == 7  # exact: no 6.999999
    assert check_expression("(4 - 7) / 3", [3, 4, 7]).value == Fraction(-1)
    assert solves("(4 × 3) − 7 = 5", [3, 4, 7], 5) and not solves("4 + 3", [3, 4, 7], 5)
