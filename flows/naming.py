"""Flow run names that say what a run is about: the dataset's digest and the params' hash.

Prefect calls these when it creates the run (`flow_run_name=`), with the run's parameters in
`prefect.runtime.flow_run.parameters`. A name is a label, so a project that cannot be read yet
gets a plain one rather than a failed run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _params(overrides: list[str] | None, preset: str | None, project: str) -> tuple[Any, str]:
    """(config, first 8 hex of the params hash that the registered version will carry as a tag)."""
    from pipelines import config
    from pipelines.paths import Paths
    from pipelines.registry import lineage

    cfg = config.load(Paths(Path(project).resolve()).params, overrides, preset)
    return cfg, lineage.params_hash(cfg)[:8]


def _dataset_label(cfg: Any, root: Path) -> str:
    """`data-<sha256 prefix>` of a local dataset, else what the data is (generator or hub name)."""
    from pipelines.hashing import content_digest

    if not cfg.data.path:
        return "generated-" + "".join(c if c.isalnum() else "-" for c in Path(cfg.task).name.split(":")[-1])[:40]
    if cfg.data.path.startswith("hf:"):
        return cfg.data.path.replace("/", "-")
    path = Path(cfg.data.path)
    path = path if path.is_absolute() else root / path
    return f"data-{content_digest(path)[:12]}" if path.exists() else "data-missing"


def training_run_name() -> str:
    """`train-data-<digest>-params-<hash>` (or `train-generated-<task>-...`)."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    try:
        root = Path(p.get("project") or ".").resolve()
        cfg, params = _params(p.get("overrides"), p.get("preset"), str(root))
        return f"train-{_dataset_label(cfg, root)}-params-{params}"
    except Exception:
        return "train"


def retrain_run_name() -> str:
    """`retrain-data-<digest>-params-<hash>`, the params as they will be with the new data path."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    digest = str(p.get("digest") or "unknown")[:12]
    try:
        overrides = [*(p.get("overrides") or []), f"data.path={json.dumps(p['dataset_path'])}"]
        _, params = _params(overrides, None, p.get("project") or ".")
        return f"retrain-data-{digest}-params-{params}"
    except Exception:
        return f"retrain-data-{digest}"


def run_tags(root: Path) -> list[str]:
    """`preset:<name|none>`, `data:<digest or source>`, `params:<hash>` of params.yaml as it is now
    (after the run's preset and overrides went in): what the run trains on, searchable in the UI."""
    from pipelines import config
    from pipelines.paths import Paths
    from pipelines.registry import lineage

    cfg = config.load(Paths(root).params)
    data = _dataset_label(cfg, root).removeprefix("data-")  # a digest, or generated-<task>, or the hub name
    return [f"preset:{cfg.preset or 'none'}", f"data:{data}", f"params:{lineage.params_hash(cfg)[:8]}"]


def tag_this_run(root: Path) -> list[str]:
    """Add `run_tags` to the current flow run (a deployment's run starts with the deployment's tags
    only). A label: a project that cannot be read, or an API that refuses, leaves the run untagged."""
    from prefect import get_client, get_run_logger
    from prefect.runtime import flow_run

    try:
        tags = run_tags(root)
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run.id).tags or []
            client.update_flow_run(flow_run.id, tags=[*current, *(t for t in tags if t not in current)])
    except Exception as exc:
        get_run_logger().warning("flow run not tagged: %s", exc)
        return []
    get_run_logger().info("tags: %s", ", ".join(tags))
    return tags
