"""The rollout ledger: one Parquet file per kept training step, whole across a resume, off at 0."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.grpo import ledger, trainer
from pipelines.paths import Paths
from tests.conftest import prepared_project

OVERRIDES = ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.eval_every=0"]
COLUMNS = {
    "step", "prompt_id", "group", "completion", "completion_ids", "text", "sampler_logps", "reward", "advantage",
    "truncated", "reward_accuracy", "reward_format", "turns",
}  # fmt: skip


def test_smoke_run_ledger_rows_columns_and_resume_without_duplicates(tmp_path, tiny_reference, capsys):
    root = tmp_path / "p"
    cfg = prepared_project(root, tiny_reference, OVERRIDES)
    paths = Paths(root)
    trainer.run(cfg, paths, log_to_mlflow=False)
    folder = ledger.ledger_dir(root)
    assert sorted(ledger.parts(folder)) == [1, 2, 3, 4]
    frame = ledger.read(folder)
    P, G = cfg.train.prompts_per_step, cfg.train.num_generations
    assert len(frame) == 4 * P * G
    assert set(frame.columns) == COLUMNS
    one = frame[frame["step"] == 1]
    assert sorted(one["group"].unique()) == list(range(P))
    assert sorted(one["completion"].unique()) == list(range(G))
    assert one.groupby("group")["prompt_id"].nunique().eq(1).all()
    # Token ids and (when reported) log-probs line up; advantages are group-relative.
    for ids, logps in zip(frame["completion_ids"], frame["sampler_logps"], strict=True):
        assert len(ids) <= cfg.train.max_completion_length
        assert logps is None or len(logps) == len(ids)
    assert abs(frame.groupby(["step", "group"])["advantage"].mean()).max() < 1e-5
    assert frame["reward_accuracy"].isin([0.0, 1.0]).all()
    assert set(ledger.flat_prompts(frame)) <= set(frame["prompt_id"])
    assert len(ledger.top_advantages(frame, 3)) == 3
    assert len(ledger.prompt_history(frame, frame["prompt_id"][0])) >= G
    assert json.loads(paths.train_summary.read_text())["verifiers"].keys() == {"accuracy", "format"}
    from flows.cli import main

    assert main(["ledger", "top", "-n", "2", "--project", str(root)]) == 0
    assert main(["ledger", "flat", "--project", str(root)]) == 0
    assert main(["ledger", "history", str(frame["prompt_id"][0]), "--project", str(root)]) == 0
    said = capsys.readouterr().out
    assert "advantage" in said and "stayed flat" in said and "truncated" in said

    # Cut after step 4's ledger part but with the newest checkpoint at step 2: the resumed run redoes
    # steps 3 and 4 and overwrites their parts (exact resume: the same rollouts), never adds rows.
    before = frame
    shutil.rmtree(paths.checkpoints_dir / "step-000004")
    (paths.checkpoints_dir / "latest.json").write_text(json.dumps({"step": 2, "path": "step-000002"}))
    result = trainer.run(cfg, paths, log_to_mlflow=False)
    assert result.resumed_from == 2
    after = ledger.read(folder)
    assert len(after) == len(before)
    assert not after.duplicated(["step", "group", "completion"]).any()
    assert after["text"].tolist() == before["text"].tolist()


def test_ledger_every_zero_writes_nothing(tmp_path, tiny_reference):
    root = tmp_path / "p"
    cfg = prepared_project(root, tiny_reference, ["train.steps=2", "train.eval_every=0", "train.ledger_every=0"])
    trainer.run(cfg, Paths(root), log_to_mlflow=False)
    assert ledger.parts(ledger.ledger_dir(root)) == {}


def test_record_keeps_every_nth_step_and_drops_parts_a_longer_earlier_run_left(tmp_path):
    folder = tmp_path / "ledger"
    made = pa.table({"step": [0]})
    for step in (1, 2, 3, 4, 5):
        ledger.record(folder, step, 1, lambda: made)
    for step in (1, 2, 3):  # a new run, every 2nd step: steps 2 and its own, nothing stale after
        ledger.record(folder, step, 2, lambda: made)
    assert sorted(ledger.parts(folder)) == [2]
    assert pq.read_table(ledger.part_path(folder, 2)).num_rows == 1
    assert not list(folder.glob(".*tmp"))


def test_ledger_history_without_an_id_is_a_usage_error(capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["ledger", "history"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: grpo") and "error: ledger history needs the prompt's id" in err
