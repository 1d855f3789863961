"""bench/gpu_check.sh, the device check for the GPU machine: its CPU dry run here, its CUDA parts there.

The dry run is the whole script at tiny sizes (2-layer models, G=2, 2 prompts, 8 tokens), TRL
included, so that the one run the GPU machine's few minutes allow is not spent on a typo. The tests
marked `gpu` are what the script's last phase runs there (`pytest -m gpu`); here they are skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("mlflow", "prefect", "dvc", "great_expectations")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--device", "cpu", "--python", sys.executable, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out, proc


def test_dry_run_runs_every_section(dry_run):
    out, proc = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    failed = {n: s.get("error", s.get("result")) for n, s in report["sections"].items() if not s.get("ok")}
    assert not failed, f"{failed}\n{proc.stdout[-3000:]}"
    assert report["dry_run"] and report["device"] == "cpu" and report["ok"]
    assert set(report["sections"]) == {"step", "ours", "generate", "flops", "trl"}
    assert all(s["ran"] for s in report["sections"].values())
    # Every completion was held to the full length, in both engines, so a step is the same work.
    tokens = report["sizes"]["prompts"] * report["sizes"]["group"] * report["sizes"]["completion_tokens"]
    assert report["sections"]["ours"]["result"]["completion_tokens_per_step"] == tokens
    assert report["sections"]["trl"]["result"]["completion_tokens_per_step"] == tokens
    assert report["targets"]["throughput_vs_trl"] > 0


def test_dry_run_step_is_within_tolerance(dry_run):
    out, _ = dry_run
    step = json.loads((out / "gpu_check.json").read_text())["sections"]["step"]["result"]
    assert step["passed"] and step["lora_tensors"] > 0
    assert step["loss_relative_difference"] <= 1e-4 and step["grad_max_relative_difference"] <= 1e-4


def test_check_imports_only_what_the_gpu_image_has(dry_run):
    # TRL's section is left out: transformers imports MLflow for its callbacks where it is installed,
    # as it is here; the image has none, and the dry run's TRL section passing shows TRL needs none.
    out, _ = dry_run
    sections = json.loads((out / "gpu_check.json").read_text())["sections"]
    for name in ("step", "ours", "generate", "flops"):
        assert sections[name]["forbidden_modules_loaded"] == [], name


def test_script_records_its_phases(dry_run):
    out, proc = dry_run
    phases = {p["phase"]: p for p in json.loads((out / "phases.json").read_text())["phases"]}
    assert phases["install"]["ran"] is False  # --python: the environment is used as it is
    assert phases["check"]["ran"] and phases["check"]["rc"] == 0, proc.stdout[-3000:]
    # The gpu tests are collected and skipped here; their outcome is other files' business.
    assert phases["tests"]["ran"] and (out / "gpu_tests.xml").exists()
    assert sum(p["limit_s"] for p in phases.values()) <= 480


@pytest.mark.gpu
@needs_cuda
def test_step_on_cuda_equals_the_cpu_step():
    from bench import gpu_check

    result = gpu_check.section_step(torch.device("cuda"), gpu_check.DRY, seed=0)
    assert result["passed"], result


@pytest.mark.gpu
@needs_cuda
def test_sampling_and_training_pass_run_on_cuda():
    from bench import gpu_check

    result = gpu_check.section_ours(torch.device("cuda"), gpu_check.DRY, seed=0)
    sizes = gpu_check.DRY
    assert result["completion_tokens_per_step"] == sizes.prompts * sizes.group * sizes.completion_tokens
    assert result["peak_memory_gib"] > 0
