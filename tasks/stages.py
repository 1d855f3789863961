"""One Prefect task per pipeline stage; each reads params.yaml afresh, as `dvc repro` does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipelines import config, kept_params, params_file
from pipelines.paths import Paths
from pipelines.stages import run_stage
from tasks.logs import domain_logs_to_prefect
from tasks.mlflow_links import run_link
from tasks.retry import SERVER_RETRIES


@task(name="apply-params")
def apply_params(root: Path, overrides: list[str], preset: str | None) -> None:
    """Persist the run's preset and overrides into params.yaml (what `dvc exp run -S` does); before a
    preset's values go in, the user's own file is kept aside for `grpo params restore`."""
    logger = get_run_logger()
    if preset is not None:
        kept = kept_params.keep_before_preset(root)
        logger.warning(
            "params.yaml gets the %r preset's values (dvc.lock records what ran); %s",
            preset,
            f"your own params.yaml is kept in {kept_params.KEPT}: `grpo params restore` puts it back"
            if kept
            else "no copy of your own params.yaml was kept (it already held a preset's values)",
        )
    if overrides or preset is not None:
        params_file.write_params(Paths(root).params, overrides, preset)
        logger.info("params.yaml: %s", ", ".join([*([f"--preset {preset}"] if preset else []), *overrides]))


@task(name="stage", task_run_name="{name}")
def stage(root: Path, name: str) -> dict[str, Any]:
    """Run one pipeline stage on the project at `root`."""
    paths = Paths(root)
    cfg = config.load(paths.params)
    try:
        with domain_logs_to_prefect():  # the stage's own lines (pipelines.*) in this task run's logs
            result = run_stage(name, cfg, paths)
    except Exception:
        if name == "validate":
            _validation_artifact(paths)  # a refused dataset's report is the one people need to see
        raise
    _artifact(name, paths, result)
    return result


def stage_task(name: str) -> Task[..., dict[str, Any]]:
    """The task that runs stage `name`: registration talks to the MLflow server, so it retries
    transient failures with backoff (tasks/retry.py); the other stages work on local files."""
    return stage.with_options(**SERVER_RETRIES) if name == "register" else stage


def _validation_artifact(paths: Paths) -> None:
    """reports/validation.json as a markdown table of expectations (passed or refused)."""
    from pipelines.data.report import markdown_summary

    if paths.validation_report.exists():
        report = json.loads(paths.validation_report.read_text(encoding="utf-8"))
        create_markdown_artifact(
            markdown_summary(report),
            key="grpo-validate",
            description="dataset validation: each Great Expectations check, passed or refused",
        )


def _artifact(name: str, paths: Paths, result: dict[str, Any]) -> None:
    key = f"grpo-{name}"
    if name == "validate":
        _validation_artifact(paths)
    elif name == "train":
        _training_artifacts(paths)
    elif name == "evaluate" and paths.eval_report.exists():
        create_markdown_artifact(
            _inline_chart(paths.eval_report, paths.eval_chart),
            key=key,
            description="held-out evaluation: reference, champion and candidate side by side (reports/eval.md)",
        )
    elif name == "register":
        checks = "".join(
            f"| {rule} | {'holds' if ok else 'fails'} |\n" for rule, ok in (result.get("checks") or {}).items()
        )
        create_markdown_artifact(
            f"## Registry\n\nVersion **{result['version']}** of `{result['name']}`: "
            f"{'promoted to champion' if result['promoted'] else 'kept as challenger'} ({result['reason']}).\n"
            + (f"\n| gate rule | |\n|---|---|\n{checks}" if checks else ""),
            key=key,
            description="registration: the version, the gate's decision and its rules",
        )


# The curves worth a glance in the UI, in the order of the table artifact.
CURVE_COLUMNS = (
    "step",
    "reward",
    "reward_std",
    "kl",
    "entropy",
    "frac_reward_zero_std",
    "completions/mean_length",
    "step_time",
)


def _training_artifacts(paths: Paths) -> None:
    """Final metrics, the curves (inline PNG), the MLflow run link, and the reward curve as a table."""
    import csv

    if not paths.train_summary.exists():
        return
    final = json.loads(paths.train_summary.read_text(encoding="utf-8"))
    run_id = final.get("mlflow_run_id")
    rows = "".join(
        f"| {key} | {rounded(value)} |\n"
        for key, value in final.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    )
    text = f"## Training\n\n**{final.get('steps', '?')} steps**; final step:\n\n| metric | value |\n|---|---|\n{rows}"
    text += _validation_text(final)
    if run_id:
        text += f"\nMLflow run: {run_link(paths.root, run_id)}\n"
    if paths.train_curves.exists():
        text += f"\n![training curves]({_png_data_uri(paths.train_curves)})\n"
    create_markdown_artifact(text, key="grpo-train", description="GRPO training: final metrics, curves, MLflow run")
    if paths.train_plot.exists():
        with paths.train_plot.open(encoding="utf-8") as fh:
            table = [{k: _rounded_cell(row[k]) for k in CURVE_COLUMNS if k in row} for row in csv.DictReader(fh)]
        if table:
            create_table_artifact(table, key="grpo-train-curve", description="reward and friends per training step")


def rounded(value: object) -> str:
    """A figure as the artifacts show it: 3 decimals, 3 significant digits below 0.001 (a KL of 1e-5
    is not 0.000); whole numbers and text as they are.

    >>> rounded(0.3939393939393939), rounded(12), rounded(0.0000123), rounded(0.0), rounded(None)
    ('0.394', '12', '1.23e-05', '0.000', '–')
    """
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.3g}" if 0 < abs(value) < 0.001 else f"{value:.3f}"


def _rounded_cell(text: str) -> str:
    """A CSV cell of train_metrics, rounded as `rounded` does when it is a decimal number."""
    try:
        return text if text.lstrip("-").isdigit() else rounded(float(text))
    except ValueError:
        return text


def _validation_text(final: dict[str, Any]) -> str:
    """Which step left `train` and why, and any decline alarm, in words (reports/train.json's validation)."""
    v = final.get("validation")
    if not v:
        return ""
    lines = [
        "",
        f"**Validation** ({v['evaluations']} evaluations, {v['time_share']:.0%} of training time): reference "
        f"{rounded(v['reference_accuracy'])}, best step {v['best_step']} at {rounded(v['best_accuracy'])}, last "
        f"step {v['last_step']} at {rounded(v['last_accuracy'])}; the policy is step **{final.get('selected_step')}** "
        f"(train.select={final.get('select')}"
        + (
            f"; within {v['select_tolerance']:g} standard error(s) of the best, the later step is preferred)."
            if v.get("select_tolerance") and v.get("selected_step") != v["best_step"]
            else ")."
        ),
    ]
    if v.get("stop_reason"):
        lines.append(f"\n{v['stop_reason']}.")
    for alarm in v.get("alarms") or []:
        lines.append(f"\n> ⚠ {alarm['message']}")
    return "\n".join(lines) + "\n"


def _png_data_uri(png: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def _inline_chart(report: Path, chart: Path) -> str:
    """eval.md with its chart embedded: the Prefect UI cannot follow a link to a file beside the report."""
    text = report.read_text()
    if chart.exists():
        text = text.replace(f"]({chart.name})", f"]({_png_data_uri(chart)})")
    return text
