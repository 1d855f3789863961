"""Exact resume: a training killed with SIGKILL and restarted ends with the same weights as one that ran through."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from pipelines.grpo import trainer
from pipelines.paths import Paths
from tests.conftest import cli_env, prepared_project

OVERRIDES = [
    "train.steps=24",
    "train.checkpoint_every=2",
    "train.learning_rate=0.01",
    # A schedule that changes the rate at every step: a resumed run must pick up its position.
    "train.warmup_steps=3",
    "train.lr_scheduler=cosine",
    # A reward that varies between completions of a random model, so the weights really move.
    "train.rewards=[{name: length, weight: 1.0, params: {target_chars: 30}}]",
]


def test_kill_and_resume_equals_uninterrupted(tmp_path, tiny_reference):
    straight = tmp_path / "straight"
    cfg = prepared_project(straight, tiny_reference, OVERRIDES)
    trainer.run(cfg, Paths(straight), log_to_mlflow=False)
    expected = load_file(str(Paths(straight).policy_dir / "adapter_model.safetensors"))

    killed = tmp_path / "killed"
    prepared_project(killed, tiny_reference, OVERRIDES)
    paths = Paths(killed)
    args = [sys.executable, "-m", "flows.cli", "train", "--preset", "smoke", *[a for o in OVERRIDES for a in ("-S", o)]]
    proc = subprocess.Popen(args, cwd=killed, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = paths.checkpoints_dir / "latest.json"
    deadline = time.time() + 120
    while not pointer.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert pointer.exists(), "no checkpoint was written before the deadline"
    assert not paths.policy_dir.exists(), "training finished before it could be killed"
    stopped_at = json.loads(pointer.read_text())["step"]
    assert 0 < stopped_at < 24

    resumed = subprocess.run(args, cwd=killed, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    assert json.loads(resumed.stdout[resumed.stdout.index("{") :])["resumed_from"] >= stopped_at

    got = load_file(str(paths.policy_dir / "adapter_model.safetensors"))
    assert set(got) == set(expected)
    moved = sum(float((expected[k] != 0).float().sum()) for k in expected if "lora_B" in k)
    assert moved > 0, "the adapter never moved: the test would pass trivially"
    for name in expected:
        assert (got[name] - expected[name]).abs().max() < 1e-6, name
    history = [line.split(",")[0] for line in paths.train_plot.read_text().splitlines()[1:]]
    assert history == [str(i) for i in range(1, 25)]  # the curve is whole across the restart
    # The rate followed the schedule (logged after each step): up over 3 warmup steps, then down to 0.
    for run in (Paths(straight), paths):
        rates = [float(row["learning_rate"]) for row in csv.DictReader(run.train_plot.read_text().splitlines())]
        assert rates[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01])
        assert all(a > b for a, b in zip(rates[2:], rates[3:], strict=False))
        assert rates[-1] == pytest.approx(0.0, abs=1e-12)


def _signal_for_addition_only(prompts, completions, id, **_):
    """Varies between completions of `add-*` rows only: about half the groups are flat."""
    return [float(len(c) % 5) if i.startswith("add") else 0.0 for c, i in zip(completions, id, strict=True)]


@pytest.mark.parametrize("selective", [False, True], ids=["dynamic", "dynamic+selective"])
def test_resume_with_adaptive_dynamic_sampling_equals_uninterrupted(tmp_path, tiny_reference, monkeypatch, selective):
    """The oversampling factor comes from the last step's flat share, and selective rollouts skip by
    each prompt's flat streak: a resumed run must draw the same prompts."""
    from pipelines.grpo import run_logger as tracking
    from pipelines.verifiers import rewards

    monkeypatch.setitem(rewards.REWARDS, "addonly", _signal_for_addition_only)
    overrides = [
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.learning_rate=0.01",
        "train.prompts_per_step=2",
        "train.rewards=[{name: addonly}]",
        "train.dynamic_sampling=true",
        "train.dynamic_sampling_oversample=auto",
        f"train.selective_rollouts={str(selective).lower()}",
        "train.selective_rollouts_explore=0.2",
        # a small split, so that prompts come back within 6 steps and their streaks matter
        "data.generator.num_rows=12",
        "data.eval_fraction=0.25",
    ]
    straight = tmp_path / "straight"
    cfg = prepared_project(straight, tiny_reference, overrides)
    trainer.run(cfg, Paths(straight), log_to_mlflow=False)
    expected = load_file(str(Paths(straight).policy_dir / "adapter_model.safetensors"))
    straight_history = json.loads((Paths(straight).checkpoints_dir / "step-000006" / "state.json").read_text())[
        "history"
    ]
    assert any(h["prompts_sampled"] > 2 for h in straight_history), "no step oversampled: the test would pass trivially"
    if selective:
        assert sum(h["prompts_skipped"] for h in straight_history[4:]) > 0, "nothing skipped after the restart point"

    stopped = tmp_path / "stopped"
    cfg = prepared_project(stopped, tiny_reference, overrides)
    original = tracking.RunLogger.step

    def crash_after_four(self, step, *args, **kwargs):
        if step == 5:
            raise KeyboardInterrupt  # after step 4's checkpoint, before step 5's
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(tracking.RunLogger, "step", crash_after_four)
    try:
        trainer.run(cfg, Paths(stopped), log_to_mlflow=False)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the run was not interrupted")
    monkeypatch.setattr(tracking.RunLogger, "step", original)
    result = trainer.run(cfg, Paths(stopped), log_to_mlflow=False)
    assert result.resumed_from == 4
    got = load_file(str(Paths(stopped).policy_dir / "adapter_model.safetensors"))
    for name in expected:
        assert (got[name] - expected[name]).abs().max() < 1e-6, name
