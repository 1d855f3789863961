"""The retrain flow: new data (an event's path and digest) -> the pipeline on it -> the gate decides.

`grpo serve` runs it when `grpo.dataset.updated` arrives. The dataset becomes `data.path` in
params.yaml (as `grpo run -S data.path=...` would write it), then the stages run as in the training
flow; data and params that dvc.lock already records rerun nothing, and the run says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow

from flows.naming import retrain_run_name, tag_this_run
from flows.pipeline import run_stages
from tasks.retrain import check_dataset, report
from tasks.stages import apply_params
from tasks.workspace import one_run_at_a_time


@flow(name="grpo-retrain", flow_run_name=retrain_run_name, log_prints=True)
def retrain(dataset_path: str, digest: str, project: str = ".", overrides: list[str] | None = None) -> dict[str, Any]:
    """validate -> snapshot -> train -> evaluate -> register on `dataset_path`, or reuse the last result."""
    root = Path(project).resolve()
    with one_run_at_a_time(root):
        check_dataset(root, dataset_path, digest)
        # JSON quoting keeps the path a string whatever it looks like to YAML (`-S` values are YAML).
        apply_params(root, [*(overrides or []), f"data.path={json.dumps(dataset_path)}"], None)
        tag_this_run(root)
        stages = run_stages(root)
    return report(root, dataset_path, digest, stages)
