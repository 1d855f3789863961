"""Start data-parallel training: `train.num_processes` ranks under torchrun on this machine.

`trainer.run` calls `launch` when `train.num_processes > 1` and it is not already a rank, so
`grpo train`, `dvc repro` and the Prefect task all get it. Each rank runs `python -m pipelines.grpo`
(grpo/__main__.py), which calls `trainer.run` under torchrun; `torchrun --nproc_per_node N -m
flows.cli train` works as well. How a step is split across the ranks: distributed.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipelines.config import Config
from pipelines.grpo.distributed import DistributedError, check
from pipelines.paths import Paths


def launch(cfg: Config, paths: Paths, log_to_mlflow: bool) -> dict[str, Any]:
    """Run training in `cfg.train.num_processes` processes under torchrun; return rank 0's result."""
    n = cfg.train.num_processes
    check(cfg.train, n)  # fail here, before starting processes
    with tempfile.TemporaryDirectory(prefix="grpo-ddp-") as tmp:
        config_file, result_file = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config_file.write_text(cfg.model_dump_json(), encoding="utf-8")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            "-m",
            "pipelines.grpo",
            "--project",
            str(paths.root),
            "--config",
            str(config_file),
            "--result",
            str(result_file),
            *([] if log_to_mlflow else ["--no-mlflow"]),
        ]
        done = subprocess.run(command, env=_child_env(n), check=False)
        if done.returncode != 0 or not result_file.exists():
            raise DistributedError(
                f"data-parallel training ({n} processes under torchrun) exited with code {done.returncode}; "
                "the failing rank's error is printed above"
            )
        return json.loads(result_file.read_text(encoding="utf-8"))


def _child_env(n: int) -> dict[str, str]:
    env = dict(os.environ)
    # The ranks import the same code as this process, wherever it was imported from.
    code_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (code_root, env.get("PYTHONPATH")) if p)
    # Share the cores instead of oversubscribing them (torchrun would say 1 and warn).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    # --standalone is one machine: keep gloo on loopback rather than on whatever the hostname resolves to.
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env
