"""What `dvc plots show` and `dvc metrics show` give a user after train, evaluate and register on a tiny model:
every plot dvc.yaml declares renders from the files the stages write, and the metrics table fits a terminal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, cli_env, make_project

# A metrics table wider than this wraps in a terminal (the table was 2,876 characters wide).
MAX_WIDTH = 200


pytestmark = pytest.mark.usefixtures("fresh_tracking_uri")


@pytest.fixture(scope="module")
def pipeline_outputs(tmp_path_factory, tiny_reference):
    """A DVC project after `grpo train`, `grpo evaluate` and `grpo register` on the smoke preset."""
    from pipelines import config
    from pipelines.data import validate
    from pipelines.evaluation import stage as evaluate
    from pipelines.grpo import trainer
    from pipelines.paths import Paths
    from pipelines.registry import stage as registry

    root = make_project(tmp_path_factory.mktemp("views") / "project", dvc=True)
    cfg = config.load(root / "params.yaml", ["train.steps=3", "train.eval_every=1"], preset="smoke")
    paths = Paths(root)
    validate.run(cfg, paths)
    shutil.copytree(tiny_reference, paths.reference_dir)
    trainer.run(cfg, paths, log_to_mlflow=False)
    evaluate.run(cfg, paths)
    registry.run(cfg, paths)
    return paths


def _dvc(root, *args) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_declared_plot_renders(pipeline_outputs):
    root = pipeline_outputs.root
    declared = [next(iter(plot)) for plot in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]]
    assert {"reward", "kl", "accuracy", "length", "validation"} <= set(declared)

    shown = json.loads(_dvc(root, "plots", "show", "--json"))
    assert not shown.get("errors"), shown["errors"]  # e.g. a column a plot names that the CSV lacks
    for name in declared:
        (plot,) = shown["data"][name]
        content = plot["content"]
        assert content["data"]["values"], f"{name} has no points"
        assert content["title"]["text"], f"{name} has no title"
    validation = shown["data"]["validation"][0]["content"]["data"]["values"]
    assert {v["step"] for v in validation} == {"0", "1", "2", "3"}  # the reference, then every step
    # The CSVs are drawn only through the definitions above, not once more as raw files.
    assert "plots/train.csv" not in shown["data"] and "plots/val.csv" not in shown["data"]
    assert {"plots/train.png", "reports/eval.png"} <= set(shown["data"])


def test_metrics_show_is_the_figures_people_compare_and_fits_a_terminal(pipeline_outputs):
    root = pipeline_outputs.root
    table = _dvc(root, "metrics", "show").splitlines()
    header = table[0].split()
    assert header[0] == "Path" and [line.split()[0] for line in table[1:]] == [
        "metrics/train.json",
        "metrics/eval.json",
        "metrics/registry.json",
    ]
    assert set(header[1:]) == {
        "reward", "kl", "steps", "selected_step", "val_accuracy",  # training
        "accuracy", "lenient_accuracy", "pass_at_k", "format_rate", "gain",  # the candidate on the test split
        "version", "decision",  # the registry
    }  # fmt: skip
    assert max(map(len, table)) < MAX_WIDTH, "\n".join(table)

    # Still under it when every figure takes its widest form (DVC rounds to 5 digits).
    for name in ("train", "eval", "registry"):
        path = root / "metrics" / f"{name}.json"
        figures = json.loads(path.read_text())
        widest = {k: ("promoted" if k == "decision" else "1234" if k == "version" else -0.123456789) for k in figures}
        path.write_text(json.dumps(widest))
    table = _dvc(root, "metrics", "show").splitlines()
    assert max(map(len, table)) < MAX_WIDTH, "\n".join(table)
