"""Stage 1: the GX suite accepts good data, refuses bad files by name and line, and writes atomically."""

from __future__ import annotations

import json

import pytest

from pipelines import config
from pipelines.data import validate
from pipelines.data.sources import DataError
from pipelines.paths import Paths
from tests.conftest import GSM8K


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_generator_dataset_validates_and_splits(project, smoke_cfg):
    paths = Paths(project)
    result = validate.run(smoke_cfg, paths)
    train = [json.loads(line) for line in paths.train_split.read_text().splitlines()]
    held_out = [json.loads(line) for line in paths.eval_split.read_text().splitlines()]
    assert result.train_rows == len(train) and result.eval_rows == len(held_out) == 8
    assert not {r["id"] for r in train} & {r["id"] for r in held_out}
    assert held_out[0]["prompt"][-1]["role"] == "user" and "####" in held_out[0]["prompt"][-1]["content"]
    report = json.loads(paths.validation_report.read_text())
    assert report["success"] and report["digest"] == result.digest
    assert (paths.data_docs / "index.html").exists()
    assert (paths.gx_root / "gx" / "expectations").is_dir()
    # Same params, same split and digest: deterministic.
    assert validate.run(smoke_cfg, paths).digest == result.digest


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            [{"id": "a", "prompt": "p", "answer": "1"}, {"id": "b", "prompt": "q"}],
            ["expect_column_values_to_not_be_null(answer)", "line(s) 2"],
        ),
        (
            [{"id": "a", "prompt": "p", "answer": "1"}, {"id": "a", "prompt": "q", "answer": "2"}],
            ["expect_column_values_to_be_unique(id)", "line(s) 1, 2"],
        ),
        ([{"id": "a", "prompt": "p", "answer": "1"}, "{not json"], ["not valid UTF-8 JSON", "line 2"]),
        (
            [{"id": "a", "prompt": "p", "answer": "one"}],
            ["expect_column_values_to_match_regex(answer_final)", "line(s) 1"],
        ),
        ([{"id": "a", "prompt": 5, "answer": "1"}], ["expect_column_values_to_be_in_set(prompt_kind)", "line(s) 1"]),
    ],
)
def test_bad_files_are_refused_by_file_and_line(project, smoke_cfg, rows, expected):
    bad = _write(project / "bad.jsonl", rows)
    cfg = smoke_cfg.model_copy(update={"data": smoke_cfg.data.model_copy(update={"path": str(bad)})})
    with pytest.raises(DataError) as err:
        validate.run(cfg, Paths(project))
    message = str(err.value)
    assert str(bad) in message
    for part in expected:
        assert part in message


def test_failed_validation_leaves_previous_outputs(project, smoke_cfg):
    paths = Paths(project)
    validate.run(smoke_cfg, paths)
    before = paths.train_split.read_bytes()
    bad = _write(project / "bad.jsonl", [{"id": "a", "prompt": "p"}])
    with pytest.raises(DataError):
        validate.run(config.load(paths.params, [f"data.path={bad}"], preset="smoke"), paths)
    assert paths.train_split.read_bytes() == before
    assert not list(paths.validated_dir.parent.glob(".validated*"))  # no staging left behind
    assert json.loads(paths.validation_report.read_text())["success"] is False


def test_gsm8k_rows_in_their_real_format(project):
    source = GSM8K / "test.jsonl"
    if not source.exists():
        pytest.skip("shared GSM8K copy not present")
    sample = project / "gsm8k.jsonl"
    sample.write_text("".join(source.read_text().splitlines(keepends=True)[:40]))
    cfg = config.load(project / "params.yaml", [f"data.path={sample}", "data.max_eval_rows=8"], preset="smoke")
    result = validate.run(cfg, Paths(project))
    assert result.train_rows + result.eval_rows == 40
    row = json.loads(Paths(project).train_split.read_text().splitlines()[0])
    assert row["answer"].replace(",", "").lstrip("-").isdigit()  # the value after ####, not the worked solution
