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
            ["expect_column_values_to_be_null(task_issue)", "line(s) 1"],
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
    assert result.train_rows + result.val_rows + result.eval_rows == 40
    row = json.loads(Paths(project).train_split.read_text().splitlines()[0])
    assert row["answer"].replace(",", "").lstrip("-").isdigit()  # the value after ####, not the worked solution


def test_three_splits_are_disjoint_and_the_test_split_does_not_move(project):
    """The validation split comes out of train: adding it or resizing it never moves a test row."""
    paths = Paths(project)
    splits = {}
    for val in ("0", "0.1", "0.3"):
        cfg = config.load(project / "params.yaml", [f"data.val_fraction={val}", "data.max_val_rows=16"], preset="smoke")
        result = validate.run(cfg, paths)
        ids = {
            name: {json.loads(line)["id"] for line in path.read_text().splitlines()}
            for name, path in (("train", paths.train_split), ("val", paths.val_split), ("eval", paths.eval_split))
        }
        assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["eval"]) and not (ids["val"] & ids["eval"])
        assert result.val_rows == len(ids["val"]) and (result.val_rows > 0) == (val != "0")
        splits[val] = ids
    assert splits["0"]["eval"] == splits["0.1"]["eval"] == splits["0.3"]["eval"]
    assert splits["0.1"]["val"] < splits["0.3"]["val"] or len(splits["0.3"]["val"]) == 16


def test_a_prompt_in_two_splits_is_flagged_whichever_two(project, tmp_path):
    """Twins across train/val, train/eval and val/eval are all leakage; the later split's copy is set aside."""
    from pipelines.data.split import three_way

    rows = [{"id": f"q{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(60)]
    ids = [r["id"] for r in rows]
    train, val, held_out = three_way(ids, 0.2, 8, 0.2, 8, 0)
    assert train and val and held_out
    twins = [  # a copy of one prompt under a new id, placed by the hash wherever it falls
        {"id": f"twin{k}-{i}", "prompt": rows[i]["prompt"].upper(), "answer": rows[i]["answer"]}
        for k, i in enumerate([train[0], val[0], held_out[0]] * 8)
    ]
    path = tmp_path / "twins.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + twins))
    cfg = config.load(
        project / "params.yaml",
        [f"data.path={path}", "data.max_rejected_fraction=0.3", "data.val_fraction=0.2", "data.max_val_rows=8"],
        preset="smoke",
    )
    validate.run(cfg, Paths(project))
    paths = Paths(project)
    prompts = {
        name: [json.loads(line)["prompt"][-1]["content"].lower() for line in path.read_text().splitlines()]
        for name, path in (("train", paths.train_split), ("val", paths.val_split), ("eval", paths.eval_split))
    }
    for a, b in (("train", "val"), ("train", "eval"), ("val", "eval")):
        assert not set(prompts[a]) & set(prompts[b]), f"a prompt is in both {a} and {b}"
    rejected = [json.loads(line) for line in paths.rejected.read_text().splitlines()]
    assert rejected and all("also in an earlier split" in r["reason"] for r in rejected)
