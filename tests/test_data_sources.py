"""Issue 4: every source kind, the column mapping, GSM8K, countdown, leakage, token bounds and the
rejection policy, each on small files the tests write."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipelines import config
from pipelines.data import validate
from pipelines.data.sources import DataError
from pipelines.data.split import split_ids
from pipelines.paths import Paths
from tests.conftest import GSM8K


def _cfg(project: Path, *overrides: str) -> config.Config:
    # Two splits, as these tests predict them with split_ids; the validation split has its own tests.
    return config.load(project / "params.yaml", ["data.val_fraction=0", *overrides], preset="smoke")


def _problems(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"q{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(start, start + n)]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _outputs(project: Path) -> tuple[list[dict], list[dict], list[dict]]:
    paths = Paths(project)
    read = lambda p: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]  # noqa: E731
    return read(paths.train_split), read(paths.eval_split), read(paths.rejected)


def _refusal(project: Path, *overrides: str) -> str:
    with pytest.raises(DataError) as err:
        validate.run(_cfg(project, *overrides), Paths(project))
    return str(err.value)


def test_jsonl_with_text_and_chat_prompts(project):
    rows = _problems(24)
    for r in rows[::3]:
        r["prompt"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["prompt"]}]
    rows[1]["difficulty"] = 3  # an extra column reaches the reward functions
    path = _write_jsonl(project / "mixed.jsonl", rows)
    result = validate.run(_cfg(project, f"data.path={path}"), Paths(project))
    train, held_out, rejected = _outputs(project)
    assert result.train_rows + result.val_rows + result.eval_rows == 24 and not rejected
    by_id = {r["id"]: r for r in train + held_out}
    chat = by_id["q0"]["prompt"]
    assert chat == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 0 + 0?"}]
    templated = by_id["q2"]["prompt"]
    assert templated[-1] == {"role": "user", "content": "What is 2 + 2? Give the final answer after ####."}
    assert len(templated) == 3  # the worked example comes first as an earlier turn
    assert by_id["q1"]["difficulty"] == 3 and by_id["q5"]["answer"] == "10"


def test_csv_with_column_mapping_bom_quoted_lines_and_chat_cells(project):
    path = project / "data" / "raw" / "export.csv"
    with path.open("w", encoding="utf-8-sig", newline="") as fh:  # utf-8-sig: a byte-order mark, as Excel writes
        w = csv.writer(fh)
        w.writerow(["uid", "question_text", "final", "level"])
        for r in _problems(20):
            w.writerow([r["id"], r["prompt"], r["answer"], "easy"])
        w.writerow(["multi", "A question\nover two lines: what is 3 + 4?", "7", "easy"])  # lines 22-23
        w.writerow(["chat", json.dumps([{"role": "user", "content": "What is 5 + 5?"}]), "10", "easy"])
    overrides = [
        "data.columns.prompt=question_text",
        "data.columns.answer=final",
        "data.columns.id=uid",
        f"data.path={path}",
    ]
    result = validate.run(_cfg(project, *overrides), Paths(project))
    train, held_out, _ = _outputs(project)
    assert result.train_rows + result.val_rows + result.eval_rows == 22
    by_id = {r["id"]: r for r in train + held_out}
    assert by_id["q0"]["level"] == "easy" and "question_text" not in by_id["q0"] and "uid" not in by_id["q0"]
    assert by_id["multi"]["prompt"][-1]["content"].startswith("A question\nover two lines")
    assert by_id["chat"]["prompt"] == [{"role": "user", "content": "What is 5 + 5?"}]

    # A bad row after the two-line record is named by its real line in the file.
    with path.open("a", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerow(["late", "What is 9 + 9?", "", "easy"])
    message = _refusal(project, *overrides)
    assert str(path) in message and "expect_column_values_to_not_be_null(answer)" in message and "line(s) 25" in message


def test_parquet_with_chat_prompts_and_extra_columns(project):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _problems(20)
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    table = pa.table(
        {
            "prompt": prompts,
            "answer": [int(r["answer"]) for r in rows],  # numbers, not strings
            "id": [r["id"] for r in rows],
            "weight": [0.5] * 20,
        }
    )
    path = project / "problems.parquet"
    pq.write_table(table, path)
    result = validate.run(_cfg(project, f"data.path={path}"), Paths(project))
    train, held_out, _ = _outputs(project)
    assert result.train_rows + result.val_rows + result.eval_rows == 20
    row = next(r for r in train + held_out if r["id"] == "q3")
    assert row == {"weight": 0.5, "id": "q3", "prompt": [{"role": "user", "content": "What is 3 + 3?"}], "answer": "6"}

    # Parquet errors are named by row number.
    bad = pa.table({"prompt": [r["prompt"] for r in rows], "answer": ["x"] + [r["answer"] for r in rows[1:]]})
    pq.write_table(bad, path)
    message = _refusal(project, f"data.path={path}")
    assert "expect_column_values_to_be_null(task_issue)" in message and "row(s) 1" in message


def test_folder_of_mixed_files_reads_them_all_and_names_the_file(project):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = project / "data" / "raw" / "mix"
    _write_jsonl(folder / "a.jsonl", [{k: v for k, v in r.items() if k != "id"} for r in _problems(8)])
    (folder / "sub").mkdir()
    with (folder / "sub" / "b.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "answer"])
        for r in _problems(8, start=100):
            w.writerow([r["prompt"], r["answer"]])
    pq.write_table(pa.Table.from_pylist(_problems(8, start=200)), folder / "c.parquet")
    (folder / "a.jsonl.dvc").write_text("outs: []\n")  # DVC's own files are not data
    result = validate.run(_cfg(project, f"data.path={folder}"), Paths(project))
    train, held_out, _ = _outputs(project)
    ids = {r["id"] for r in train + held_out}
    assert result.train_rows + result.val_rows + result.eval_rows == 24
    assert {"a-1", "sub/b-2", "q200"} <= ids  # generated ids keep the relative path

    with (folder / "sub" / "b.csv").open("a", newline="") as fh:
        csv.writer(fh).writerow(["What is 1 + 1?", "two"])
    message = _refusal(project, f"data.path={folder}")
    assert f"{folder / 'sub' / 'b.csv'} line(s) 10" in message

    (folder / "notes.txt").write_text("not data")
    message = _refusal(project, f"data.path={folder}")
    assert "notes.txt" in message and "unknown kind" in message and "Fix" in message


def test_json_array_file(project):
    path = project / "array.json"
    path.write_text(json.dumps(_problems(20)), encoding="utf-8")
    result = validate.run(_cfg(project, f"data.path={path}"), Paths(project))
    assert result.train_rows + result.val_rows + result.eval_rows == 20


def test_hugging_face_save_to_disk(project):
    datasets = pytest.importorskip("datasets")
    rows = _problems(20)
    folder = project / "data" / "raw" / "hf"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    result = validate.run(_cfg(project, f"data.path={folder}"), Paths(project))
    assert result.train_rows + result.val_rows + result.eval_rows == 20

    both = project / "data" / "raw" / "hf-dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(_problems(20, start=50))}
    ).save_to_disk(str(both))
    message = _refusal(project, f"data.path={both}")
    assert "train, test" in message and "data.hf.split" in message
    result = validate.run(_cfg(project, f"data.path={both}", "data.hf.split=test"), Paths(project))
    assert result.train_rows + result.val_rows + result.eval_rows == 20
    assert {r["id"] for r in sum(_outputs(project)[:2], [])} == {f"q{i}" for i in range(50, 70)}


def test_hub_name_without_network_is_a_clear_refusal(project, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _refusal(project, "data.path=hf:openai/gsm8k", "data.hf.subset=main")
    assert message.startswith("hf:openai/gsm8k: cannot read it from the Hugging Face hub")
    assert "save_to_disk" in message and "Traceback" not in message


@pytest.mark.parametrize("explicit", [True, False], ids=["mapped", "auto"])
def test_gsm8k_mapping_on_real_rows(project, explicit):
    source = GSM8K / "train.jsonl"
    if not source.exists():
        pytest.skip("shared GSM8K copy not present")
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)[:50]
    sample = project / "gsm8k.jsonl"
    sample.write_text("".join(lines), encoding="utf-8")
    mapping = ["data.columns.prompt=question", "data.columns.answer=answer", "data.columns.id=null"] if explicit else []
    result = validate.run(_cfg(project, f"data.path={sample}", *mapping), Paths(project))
    assert result.train_rows + result.val_rows + result.eval_rows == 50
    train, held_out, _ = _outputs(project)
    originals = [json.loads(line) for line in lines]
    by_id = {r["id"]: r for r in train + held_out}
    first = by_id["gsm8k-1"]
    assert first["answer"] == originals[0]["answer"].split("####")[-1].strip()
    assert originals[0]["question"] in first["prompt"][-1]["content"]
    assert set(first) == {"id", "prompt", "answer"}  # question and the worked solution are not copied


def test_a_missing_mapped_column_names_the_column_and_the_fix(project):
    path = _write_jsonl(project / "qa.jsonl", [{"q": r["prompt"], "a": r["answer"]} for r in _problems(10)])
    message = _refusal(project, f"data.path={path}")
    assert "no row has the prompt column" in message and "q, a" in message and "data.columns.prompt" in message
    message = _refusal(project, f"data.path={path}", "data.columns.prompt=q")
    assert "answer column 'answer'" in message and "-S data.columns.answer=NAME" in message
    result = validate.run(
        _cfg(project, f"data.path={path}", "data.columns.prompt=q", "data.columns.answer=a"), Paths(project)
    )
    assert result.train_rows + result.val_rows + result.eval_rows == 10


def test_countdown_generator_validates_and_its_solutions_score(project):
    from pipelines.verifiers.rewards import countdown_reward

    cfg = _cfg(project, "task=countdown", "data.generator.num_rows=40")
    result = validate.run(cfg, Paths(project))
    train, held_out, _ = _outputs(project)
    assert result.train_rows + result.val_rows + result.eval_rows == 40
    report = json.loads(Paths(project).validation_report.read_text())
    assert report["task"] == "countdown"
    assert any(e["column"] == "task_issue" and e["success"] for e in report["expectations"])
    rows = train + held_out
    rewards = countdown_reward(
        [r["prompt"] for r in rows],
        [f"Let me try.\n#### {r['solution']}" for r in rows],
        numbers=[r["numbers"] for r in rows],
        answer=[r["answer"] for r in rows],
    )
    assert rewards == [1.0] * len(rows)
    wrong = countdown_reward(
        ["q"], [f"#### {rows[0]['answer']} + 0"], numbers=[rows[0]["numbers"]], answer=[rows[0]["answer"]]
    )
    assert wrong == [0.0]
    # Same params, same problems.
    assert validate.run(cfg, Paths(project)).digest == result.digest


def test_countdown_file_with_a_wrong_solution_is_refused_with_the_verifiers_words(project):
    rows = [
        {
            "id": f"c{i}",
            "prompt": f"Make {i + 10} from {i}, 10.",
            "answer": str(i + 10),
            "numbers": [i, 10],
            "solution": f"{i} + 10",
        }
        for i in range(1, 20)
    ]
    rows[4]["solution"] = "5 * 10"
    rows[6]["numbers"] = "7, 10"
    path = _write_jsonl(project / "countdown.jsonl", rows)
    message = _refusal(project, f"data.path={path}", "task=countdown")
    assert "expect_column_values_to_be_null(task_issue)" in message and "line(s) 5, 7" in message
    validate.run(_cfg(project, f"data.path={path}", "task=countdown", "data.max_rejected_fraction=0.2"), Paths(project))
    _, _, rejected = _outputs(project)
    reasons = {r["line"]: r["reason"] for r in rejected}
    assert "solution 5 * 10 gives 50, not the target 15" in reasons[5]
    assert "`numbers` must be a non-empty list" in reasons[7]


def _straddling_duplicates(n: int = 60) -> tuple[list[dict], set[str], int]:
    """Rows where every third prompt appears twice, under another id and spelling; the eval ids
    (smoke split) whose twin sits in train; and the eval size."""
    rows = []
    for k, r in enumerate(_problems(n)):
        rows.append(r)
        if k % 3 == 0:
            rows.append(
                {
                    "id": r["id"] + "-again",
                    "prompt": "  " + r["prompt"].upper().replace(" + ", "+"),
                    "answer": r["answer"],
                }
            )
    ids = [r["id"] for r in rows]
    train, held_out = split_ids(ids, 0.2, 8, 0)
    train_ids = {ids[i] for i in train}
    leaked = {ids[i] for i in held_out if ids[i].removesuffix("-again") in train_ids or ids[i] + "-again" in train_ids}
    return rows, leaked, len(held_out)


def test_leakage_between_train_and_eval_is_refused_or_set_aside(project):
    rows, leaked, n_eval = _straddling_duplicates()
    assert leaked and n_eval - len(leaked) >= 2, "the fixture must put some twins on both sides, not all"
    path = _write_jsonl(project / "dupes.jsonl", rows)
    message = _refusal(project, f"data.path={path}")
    assert "expect_column_values_to_be_in_set(prompt_in_train)" in message and "also in an earlier split" in message
    result = validate.run(_cfg(project, f"data.path={path}", "data.max_rejected_fraction=0.2"), Paths(project))
    train, held_out, rejected = _outputs(project)
    assert {r["row"]["id"] for r in rejected} == leaked
    assert all("also in an earlier split" in r["reason"] for r in rejected)
    assert not {r["id"] for r in held_out} & leaked and result.rejected_rows == len(leaked)
    assert len(train) + len(held_out) + len(rejected) == len(rows)  # nothing silently dropped


def test_tolerated_bad_rows_go_to_rejected_with_reasons(project):
    rows = _problems(30)
    rows[2]["answer"] = "many"
    rows[5]["prompt"] = ""
    rows[9]["id"] = "q8"  # duplicate of row 9's neighbour: both are set aside
    lines = [json.dumps(r) for r in rows] + ["{broken"]
    path = project / "some-bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = validate.run(_cfg(project, f"data.path={path}", "data.max_rejected_fraction=0.2"), Paths(project))
    train, held_out, rejected = _outputs(project)
    assert result.rejected_rows == len(rejected) == 5
    assert len(train) + len(held_out) + len(rejected) == 31
    by_line = {r["line"]: r for r in rejected}
    assert set(by_line) == {3, 6, 9, 10, 31}
    assert "not a number the math verifier can read" in by_line[3]["reason"] and by_line[3]["row"]["answer"] == "many"
    assert "missing or empty prompt" in by_line[6]["reason"]
    assert (
        "id used by more than one row" in by_line[9]["reason"]
        and "id used by more than one row" in by_line[10]["reason"]
    )
    assert by_line[31]["raw"] == "{broken" and "not valid JSON" in by_line[31]["reason"]
    assert all(r["file"] == str(path) for r in rejected)
    report = json.loads(Paths(project).validation_report.read_text())
    assert report["success"] and report["rejected"] == 5 and report["rejected_fraction"] == round(5 / 31, 6)


def test_too_many_bad_rows_refuse_and_keep_the_previous_outputs(project):
    paths = Paths(project)
    validate.run(_cfg(project), paths)
    before = [p.read_bytes() for p in (paths.train_split, paths.eval_split, paths.rejected)]
    rows = _problems(20)
    for r in rows[:5]:
        r["answer"] = None
    path = _write_jsonl(project / "quarter-bad.jsonl", rows)
    message = _refusal(project, f"data.path={path}", "data.max_rejected_fraction=0.2")
    assert "5 of 20 row(s) (25.0%) are bad, more than data.max_rejected_fraction=0.2" in message
    assert "line(s) 1, 2, 3, 4, 5" in message
    assert [p.read_bytes() for p in (paths.train_split, paths.eval_split, paths.rejected)] == before
    assert json.loads(paths.validation_report.read_text())["success"] is False
    # At the threshold it passes (at most max_rejected_fraction of the rows).
    validate.run(_cfg(project, f"data.path={path}", "data.max_rejected_fraction=0.25"), paths)
    assert len(_outputs(project)[2]) == 5


def test_prompt_length_in_tokens_when_a_tokenizer_is_known(project, tiny_reference):
    rows = _problems(20)
    rows[3]["prompt"] = "What is " + " + ".join(["1"] * 300) + "?"  # ~600 tokens, ~1200 characters
    path = _write_jsonl(project / "long.jsonl", rows)
    message = _refusal(project, f"data.path={path}", f"data.tokenizer={tiny_reference}", "data.max_prompt_tokens=200")
    assert "expect_column_values_to_be_between(prompt_tokens)" in message and "line(s) 4" in message
    report = json.loads(Paths(project).validation_report.read_text())
    assert report["length_unit"] == "tokens" and report["tokenizer"] == str(tiny_reference)
    # Without the tokenizer folder, the bounds are in characters (and the report says why).
    validate.run(
        _cfg(project, f"data.path={path}", f"data.tokenizer={project / 'models' / 'reference'}"), Paths(project)
    )
    report = json.loads(Paths(project).validation_report.read_text())
    assert report["length_unit"] == "characters" and "not found" in report["note"]


def test_report_lists_every_expectation_with_its_first_rows(project):
    rows = _problems(20)
    rows[7]["answer"] = "n/a"
    path = _write_jsonl(project / "one-bad.jsonl", rows)
    _refusal(project, f"data.path={path}")
    report = json.loads(Paths(project).validation_report.read_text())
    failed = [e for e in report["expectations"] if not e["success"]]
    assert [(e["expectation"], e["column"], e["where"]) for e in failed] == [
        ("expect_column_values_to_be_null", "task_issue", [f"{path}:8"])
    ]
    tables = {e["table"] for e in report["expectations"]}
    assert tables == {"rows", "leakage", "train", "eval"}
    from pipelines.data.report import markdown_summary

    summary = markdown_summary(report)
    assert (
        "## Validation: refused" in summary
        and f"{path}:8" in summary
        and summary.count("\n| ") >= len(report["expectations"])
    )
