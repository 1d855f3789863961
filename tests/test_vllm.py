"""The vllm rollout backend against a real vLLM server (the CPU build, `make vllm`) on loopback.

A tiny Llama with 32-wide attention heads (vLLM's CPU attention takes 32 and up), LoRA training
through the server: every step samples from the adapter of the step before it, the sampler/trainer
mismatch is logged, a server that dies mid-run gives a clear error and a resumable checkpoint, and
evaluation decodes on the same kind of server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipelines import config
from pipelines.data import validate
from pipelines.paths import Paths
from tests.conftest import REPO, make_project

pytestmark = pytest.mark.vllm

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
TOLERANCE = 1e-4  # fp32 on both sides: measured ~1e-6 between the server's and the trainer's log-probs


@pytest.fixture(scope="module")
def reference_32(tmp_path_factory) -> Path:
    """The tiny model with head_dim 32 (hidden 64, 2 heads, 1 KV head)."""
    from pipelines.config import SnapshotConfig, TinyModelConfig
    from pipelines.snapshot import stage

    root = tmp_path_factory.mktemp("tiny32")
    tiny = TinyModelConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    stage.run(SnapshotConfig(source="tiny", tiny=tiny), Paths(root))
    return root / "models" / "reference"


def _project(root: Path, reference: Path, *overrides: str) -> config.Config:
    if not VLLM_PYTHON.exists():
        pytest.skip(f"{VLLM_PYTHON} is missing: `make vllm` creates it")
    make_project(root)
    cfg = config.load(
        root / "params.yaml",
        [
            "runtime.rollout_backend=vllm",
            f"runtime.vllm.python={VLLM_PYTHON}",
            "runtime.vllm.max_model_len=256",
            "runtime.vllm.kv_cache_gib=1",
            "train.learning_rate=0.01",
            # A reward that varies between completions of a random model, so the adapter really moves.
            "train.rewards=[{name: length, weight: 1.0, params: {target_chars: 30}}]",
            "train.bf16=false",
            "evaluate.bf16=false",
            "data.max_val_rows=4",
            *overrides,
        ],
        preset="smoke",
    )
    validate.run(cfg, Paths(root))
    shutil.copytree(reference, Paths(root).reference_dir)
    return cfg


def test_training_samples_from_the_adapter_of_the_step_before(tmp_path, reference_32, monkeypatch):
    from pipelines.generation import vllm_backend
    from pipelines.generation.rollout import Rollout
    from pipelines.grpo import trainer
    from pipelines.grpo.logprobs import token_logps

    cfg = _project(tmp_path / "p", reference_32, "train.steps=3", "train.eval_every=2")
    prompt, completion = [1, 5, 9, 13, 17], [21, 25, 29, 33, 37, 41]
    checks: list[float] = []
    original = vllm_backend.RemotePolicy.sync

    def checked_sync(self):
        original(self)  # the adapter the next step samples from
        served = self.client.prompt_logprobs(self.current, prompt + completion)[len(prompt) :]
        rollout = Rollout(
            prompt_ids=torch.tensor([prompt]), prompt_mask=torch.ones(1, len(prompt), dtype=torch.long),
            completion_ids=torch.tensor([completion]), completion_mask=torch.ones(1, len(completion), dtype=torch.long),
            truncated=torch.tensor([True]), texts=[""],
        )  # fmt: skip
        with torch.no_grad():
            trained, _ = token_logps(self.policy, rollout)
        checks.append(float((torch.tensor(served) - trained[0]).abs().max()))

    monkeypatch.setattr(vllm_backend.RemotePolicy, "sync", checked_sync)
    result = trainer.run(cfg, Paths(tmp_path / "p"), log_to_mlflow=False)
    assert result.steps == 3
    assert len(checks) == 4  # the start, then after each of the 3 steps
    assert max(checks) < TOLERANCE, checks
    history = json.loads((Paths(tmp_path / "p").checkpoints_dir / "step-000003" / "state.json").read_text())["history"]
    moved = [h["sampling/sampling_logp_difference/max"] for h in history]
    assert all(0 <= m < 1e-3 for m in moved), moved  # logged every step; fp32 server vs fp32 trainer
    summary = json.loads(Paths(tmp_path / "p").train_summary.read_text())
    assert summary["validation"]["evaluations"] == 3  # steps 0, 2, 3: validation decodes on the server too
    assert not list((tmp_path / "p" / ".vllm" / "adapters").glob("*")), "adapter folders left behind"


@pytest.mark.slow  # (64 s: a server started twice; run with `make test-slow`)
def test_a_server_that_dies_mid_run_gives_a_clear_error_and_training_resumes(tmp_path, reference_32, monkeypatch):
    from pipelines.generation import vllm_server
    from pipelines.generation.vllm_client import VLLMError
    from pipelines.grpo import run_logger, trainer

    cfg = _project(tmp_path / "p", reference_32, "train.steps=4", "train.checkpoint_every=1", "train.eval_every=0")
    started = []
    real_start = vllm_server.start

    def start(*args, **kwargs):
        process, client = real_start(*args, **kwargs)
        started.append(process)
        return process, client

    monkeypatch.setattr(vllm_server, "start", start)
    real_step = run_logger.RunLogger.step

    def kill_after_two(self, step, *args, **kwargs):
        real_step(self, step, *args, **kwargs)
        if step == 2:
            vllm_server.stop(started[-1], grace_s=0)  # as a crash would: the next request finds nobody

    monkeypatch.setattr(run_logger.RunLogger, "step", kill_after_two)
    with pytest.raises(VLLMError, match=r"vLLM server at http://127\.0\.0\.1:\d+ .*(not answering|dropped)"):
        trainer.run(cfg, Paths(tmp_path / "p"), log_to_mlflow=False)
    monkeypatch.setattr(run_logger.RunLogger, "step", real_step)
    latest = json.loads((Paths(tmp_path / "p").checkpoints_dir / "latest.json").read_text())
    assert latest["step"] == 2
    result = trainer.run(cfg, Paths(tmp_path / "p"), log_to_mlflow=False)
    assert result.resumed_from == 2 and result.steps == 4 and len(started) == 2


def test_evaluation_decodes_on_the_server_like_the_lean_loop(tmp_path, reference_32):
    """Greedy answers of reference and policy on the server match the lean loop's (fp32, argmax)."""
    from pipelines.evaluation import stage as evaluate
    from pipelines.grpo import trainer

    root = tmp_path / "p"
    cfg = _project(root, reference_32, "train.steps=2", "train.eval_every=0", "evaluate.champion=false")
    lean = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"rollout_backend": "lean"})})
    trainer.run(lean, Paths(root), log_to_mlflow=False)
    evaluate.run(lean, Paths(root))
    by_lean = {(o["model"], o["id"]): o["completion"] for o in map(json.loads, Paths(root).eval_samples.open())}
    evaluate.run(cfg, Paths(root))
    by_vllm = {(o["model"], o["id"]): o["completion"] for o in map(json.loads, Paths(root).eval_samples.open())}
    assert by_lean.keys() == by_vllm.keys() and len(by_lean) == 16
    same = sum(by_lean[k] == by_vllm[k] for k in by_lean)
    assert same >= 0.9 * len(by_lean), f"{same} of {len(by_lean)} greedy answers equal"
    metrics = json.loads(Paths(root).eval_results.read_text())
    assert metrics["policy"]["problems"] == 8 and "pass_at_k" in metrics["policy"]


@pytest.mark.slow  # (the evaluation test above sends seeded samples through the same server start)
def test_many_seeded_requests_at_once_do_not_crash_the_cpu_engine(tmp_path, reference_32):
    """16 prompts x 4 samples with a seed each, as evaluation sends them: with chunked prefill on, the
    CPU build's engine died ("CPU Generator does not use offset"); the server now starts without it."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.config import VLLMConfig
    from pipelines.generation import vllm_server

    if not VLLM_PYTHON.exists():
        pytest.skip(f"{VLLM_PYTHON} is missing: `make vllm` creates it")
    cfg = VLLMConfig(python=str(VLLM_PYTHON), max_model_len=512, kv_cache_gib=1, dtype="float32")
    process, client = vllm_server.start(cfg, tmp_path, reference_32, 8)
    try:
        sampling = {"max_tokens": 16, "temperature": 0.8, "top_p": 1.0}

        def one(i: int) -> int:
            return len(client.complete("reference", list(range(100 + i, 190 + i)), 4, {**sampling, "seed": i}))

        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(one, range(16))) == [4] * 16
    finally:
        client.close()
        vllm_server.stop(process)
