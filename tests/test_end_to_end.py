"""`grpo run --preset smoke` through Prefect and DVC, then `dvc status`, `dvc repro` and the registry."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import cli_env, make_project


def _run(cwd, *args, check=True):
    proc = subprocess.run(args, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_grpo_run_smoke_end_to_end(tmp_path):
    root = make_project(tmp_path / "project", dvc=True)
    grpo = [sys.executable, "-m", "flows.cli"]
    dvc = [sys.executable, "-m", "dvc"]

    out = _run(root, *grpo, "run", "--preset", "smoke")
    results = json.loads(out.stdout[out.stdout.index("{") :])
    assert list(results) == ["validate", "snapshot", "train", "evaluate", "register"]
    # The tiny random model scores 0, as its reference does: no gain, so v1 stays challenger.
    register = results["register"]
    assert not register["promoted"] and register["version"] == "1"
    assert register["reason"].startswith("no champion yet, so the candidate must beat the reference: failed min_gain")
    assert "preset: smoke" in (root / "params.yaml").read_text()

    # Everything the flow made is recorded: nothing stale, nothing for `dvc repro` to do.
    status = _run(root, *dvc, "status", "--json")
    assert json.loads(status.stdout) == {}
    repro = _run(root, *dvc, "repro")
    assert "didn't change, skipping" in repro.stdout and "Running stage" not in repro.stdout
    lock = (root / "dvc.lock").read_text()
    for stage in ("validate", "snapshot", "train", "evaluate", "register"):
        assert f"  {stage}:" in lock
    # The outs were pushed to the local DVC remote.
    assert json.loads(_run(root, *dvc, "status", "--cloud", "--json").stdout) == {}

    # A second `grpo run` reuses every stage instead of retraining.
    again = json.loads((o := _run(root, *grpo, "run")).stdout[o.stdout.index("{") :])
    assert all(r == {"reused": True} for r in again.values())

    # Made champion by hand (the path the gate does not block), it loads in a fresh process with
    # only transformers + peft + mlflow.
    promoted = _run(root, *grpo, "promote", "1", "--reason", "end-to-end check")
    assert "v1 is champion" in promoted.stdout
    loader = f"""
import mlflow
from mlflow import MlflowClient
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
mlflow.set_tracking_uri("sqlite:///{root}/mlflow.db")
version = MlflowClient().get_model_version_by_alias("grpo-policy", "champion")
adapter = mlflow.artifacts.download_artifacts("models:/grpo-policy@champion", dst_path="{tmp_path}/a")
base = mlflow.artifacts.download_artifacts(version.tags["reference_model_uri"], dst_path="{tmp_path}/b")
tok = AutoTokenizer.from_pretrained(adapter)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
question = [{{"role": "user", "content": "What is 2 + 3?"}}]
ids = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
print("ANSWER", repr(tok.decode(out[0, ids["input_ids"].shape[1]:])), sorted(version.aliases))
"""
    loaded = _run(tmp_path, sys.executable, "-c", loader)
    assert "ANSWER" in loaded.stdout and "champion" in loaded.stdout


def test_bad_dataset_stops_the_flow_before_any_other_stage(tmp_path):
    root = make_project(tmp_path / "project", dvc=True)
    bad = root / "data" / "raw" / "bad.jsonl"
    bad.write_text('{"id": "1", "prompt": "What is 1 + 1?", "answer": "2"}\n{"id": "1", "prompt": "x"}\n{oops\n')
    proc = _run(
        root, sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "-S", f"data.path={bad}", check=False
    )
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "line 3" in proc.stderr
    assert not (root / "models").exists() and not (root / "data" / "validated" / "train.jsonl").exists()


def test_cli_validate_refuses_bad_file_with_exit_code(tmp_path):
    root = make_project(tmp_path / "project")
    bad = root / "dupes.jsonl"
    bad.write_text('{"id": "a", "prompt": "p", "answer": "1"}\n{"id": "a", "prompt": "q", "answer": "2"}\n')
    proc = _run(
        root, sys.executable, "-m", "flows.cli", "validate", "--preset", "smoke", "-S", f"data.path={bad}", check=False
    )
    assert proc.returncode == 1
    assert "expect_column_values_to_be_unique(id)" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
