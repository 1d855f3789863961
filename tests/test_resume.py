"""Exact resume: a training killed with SIGKILL and restarted ends with the same weights as one that ran through."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from pipelines.grpo import trainer
from pipelines.paths import Paths
from tests.conftest import cli_env, prepared_project

OVERRIDES = [
    "train.steps=24", "train.checkpoint_every=2", "train.learning_rate=0.01",
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
