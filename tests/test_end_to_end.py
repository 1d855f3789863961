"""`grpo run --preset smoke` through Prefect and DVC, then `dvc status`, `dvc repro` and the registry."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import cli_env, make_project


def _run(cwd, *args, check=True, env=None):
    proc = subprocess.run(args, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_grpo_run_smoke_end_to_end(tmp_path):
    root = make_project(tmp_path / "project", dvc=True)
    grpo = [sys.executable, "-m", "flows.cli"]
    dvc = [sys.executable, "-m", "dvc"]

    mine = (root / "params.yaml").read_bytes()
    out = _run(root, *grpo, "run", "--preset", "smoke")
    results = json.loads((root / "reports" / "run.json").read_text())  # every stage's result, not on the console
    assert list(results) == ["validate", "snapshot", "train", "evaluate", "register"]
    # The tiny random model scores 0, as its reference does: no gain, so v1 stays challenger.
    register = results["register"]
    assert not register["promoted"] and register["version"] == "1"
    assert register["reason"].startswith("no champion yet, so the candidate must beat the reference: failed min_gain")
    assert "preset: smoke" in (root / "params.yaml").read_text()
    # The run ends with the evaluation table of reports/eval.md, then the registry's decision.
    lines = out.stdout.rstrip().splitlines()
    report = (root / "reports" / "eval.md").read_text().splitlines()
    start = report.index(next(line for line in report if line.startswith("| metric |")))
    table = report[start : report.index("", start)]
    assert lines[-len(table) - 3 :] == [
        "Evaluation on the held-out split, 8 problems (reports/eval.md):",
        *table,
        "",
        f"Registry: grpo-policy v1 kept as challenger (no champion yet). Reason: {register['reason']}",
    ]
    assert "{" not in out.stdout
    # The stages' own lines, one per training step, and no progress bars or known library noise.
    err = out.stderr
    for said in ("pipelines.stages - validate: ", "step 1/2: reward", "step 2/2: reward", "evaluate: accuracy on 8"):
        assert said in err, err[-4000:]
    assert "register: grpo-policy v1 kept as challenger" in err
    assert "\r" not in err and "it/s]" not in err and "is_gradient_checkpointing" not in err
    assert max(len(line) for line in err.splitlines()) < 1000
    # Loudly, at the end: params.yaml holds the preset's values now, and how to go back.
    note = "grpo run: NOTE: params.yaml now holds the 'smoke' preset's values, not your own: `grpo params restore`"
    assert any(line.startswith(note) for line in err.strip().splitlines()[-3:]), err[-2000:]

    # Everything the flow made is recorded: nothing stale, nothing for `dvc repro` to do, from a plain
    # shell too (no HF_HUB_OFFLINE, another time zone), as a user's `dvc repro` or `dvc exp run` runs.
    plain = {k: v for k, v in cli_env().items() if k not in ("HF_HUB_OFFLINE", "TZ")} | {"TZ": "Asia/Tokyo"}
    status = _run(root, *dvc, "status", "--json", env=plain)
    assert json.loads(status.stdout) == {}
    repro = _run(root, *dvc, "repro", env=plain)
    assert "didn't change, skipping" in repro.stdout and "Running stage" not in repro.stdout
    # The reference pinned again from that shell is the same bytes, so nothing downstream is stale.
    _run(root, *dvc, "repro", "--force", "--single-item", "snapshot", env=plain)
    assert json.loads(_run(root, *dvc, "status", "--json", env=plain).stdout) == {}
    lock = (root / "dvc.lock").read_text()
    for stage in ("validate", "snapshot", "train", "evaluate", "register"):
        assert f"  {stage}:" in lock
    # The outs were pushed to the local DVC remote.
    assert json.loads(_run(root, *dvc, "status", "--cloud", "--json").stdout) == {}

    # A second `grpo run` reuses every stage instead of retraining; --json prints the results alone.
    again = json.loads(_run(root, *grpo, "run", "--json").stdout)
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

    # `grpo ask` loads the version once for several questions (arguments and a file), from the local
    # pinned reference (its sha256 is the version's), and says how long loading and answering took.
    (tmp_path / "questions.txt").write_text("What is 4 + 4?\n\nWhat is 9 - 3?\n")
    asked = _run(
        root, *grpo, "ask", "What is 2 + 3?", "--file", str(tmp_path / "questions.txt"), "--max-new-tokens", "4"
    )
    assert asked.stdout.startswith("grpo-policy @champion = v1, 3 questions:\n")
    assert [line[3:] for line in asked.stdout.splitlines() if line.startswith("Q: ")] == [
        "What is 2 + 3?",
        "What is 4 + 4?",
        "What is 9 - 3?",
    ]
    timing = asked.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"grpo ask: loaded grpo-policy v1 in \d+\.\d s \(base: models/reference \(sha256 matches\)\); "
        r"answered 3 questions in \d+\.\d s",
        timing,
    ), timing

    # Back to the user's own params.yaml, byte for byte: what `make demo` does first.
    restored = _run(root, *grpo, "params", "restore", "--if-preset")
    assert "params.yaml is yours again" in restored.stdout
    assert (root / "params.yaml").read_bytes() == mine


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
