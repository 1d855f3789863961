"""MLflow logging for a training run: params once, metrics per step, a table of sample completions (and each
step's in full, as Markdown), system metrics (CPU, memory) in the background, the source tags and a
description MLflow's UI shows."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines.config import Config
from pipelines.paths import Paths

if TYPE_CHECKING:
    from pipelines.grpo.validation import Score

log = logging.getLogger(__name__)

# System metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes, ...) are
# sampled this often unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise: a point every 5 s
# draws a demo of minutes in some hundred points, a smoke run of seconds in a few.
SYSTEM_METRICS_INTERVAL_S = 5.0
# MLflow's key for the run's description (the "Description" box of the run page).
NOTE = "mlflow.note.content"
# Charted only from their first point that is not 0 (then with the zeros before it): on policy
# (train.num_iterations=1) every importance ratio is 1 and the clip ratios stay 0, and three flat
# charts only push the training curves down the run page. reports/train.json and plots/train.csv keep them.
CHARTED_ONCE_NONZERO = ("clip_ratio/",)
# The completions table's numbers, rounded: float32 rewards read 0.200000003 otherwise.
DECIMALS = 3


class RunLogger:
    """Opens (or, on resume, reopens) the training run; does nothing when disabled."""

    def __init__(self, paths: Paths, cfg: Config, enabled: bool, run_id: str | None = None) -> None:
        self.enabled = enabled
        self.run_id = run_id
        self.samples = cfg.train.log_samples
        self.group = cfg.train.num_generations
        self.cfg, self.paths = cfg, paths
        self.held: dict[str, list[tuple[int, float, int]]] = {}  # key -> its 0 points (step, value, ms), not yet logged
        self.charted: set[str] = set()
        if not enabled:
            return
        import mlflow

        from pipelines.mlflow_store import flatten, setup
        from pipelines.source import mlflow_source_tags

        setup(paths.root, cfg.registry.experiment)
        # Named for the project's code, not for sys.argv[0] (a script in the virtual environment).
        tags = {**mlflow_source_tags(paths.root, "grpo train"), NOTE: describe(cfg, paths)}
        if run_id is not None:
            try:
                with _system_metrics_settings():
                    mlflow.start_run(run_id=run_id, log_system_metrics=True)
            except mlflow.exceptions.MlflowException:
                pass  # the store that held it is gone (e.g. a fresh clone): open a new run
            else:
                mlflow.set_tags(tags)
                self.charted = {k for k in mlflow.get_run(run_id).data.metrics if k.startswith(CHARTED_ONCE_NONZERO)}
                return
        with _system_metrics_settings():
            run = mlflow.start_run(
                run_name=f"grpo-{cfg.snapshot.source}-{cfg.train.steps}steps", tags=tags, log_system_metrics=True
            )
        self.run_id = run.info.run_id
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.model_dump()).items()})
        from pipelines.data.mlflow_input import log_dataset_input

        log_dataset_input(paths)  # the run's Dataset inputs show exactly which rows it saw

    def step(
        self,
        step: int,
        metrics: dict[str, float],
        rows: list[dict[str, Any]],
        texts: list[str],
        rewards: torch.Tensor,
        advantages: torch.Tensor,
    ) -> None:
        """The step's metrics, and its first `train.log_samples` completions (with training's own rewards
        and advantages) in the table and in full."""
        if not self.enabled:
            return
        import mlflow

        mlflow.log_metrics(self._chartable(step, metrics), step=step)
        if self.samples and texts:  # (with several processes, rank 0 may have kept no group this step)
            n = min(self.samples, len(texts))
            table = {
                "step": [step] * n,
                "reward": [_rounded(r) for r in rewards[:n].tolist()],
                "advantage": [_rounded(a) for a in advantages[:n].tolist()],
                "prompt": [_last_user_turn(rows[i // self.group]["prompt"]) for i in range(n)],
                "completion": texts[:n],
            }
            with _no_artifact_progress_bar():
                mlflow.log_table(table, artifact_file="completions.json")
            # The table's cells show some 15 characters each; this file shows them whole.
            mlflow.log_text(completions_markdown(table), f"completions/step-{step:06d}.md")

    def _chartable(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """The step's metrics to log now: those of CHARTED_ONCE_NONZERO held back while every point so far is
        0, and logged with the held points on the first that is not."""
        out = {}
        for key, value in metrics.items():
            if math.isnan(value):
                continue
            if key.startswith(CHARTED_ONCE_NONZERO) and key not in self.charted:
                if value == 0:
                    self.held.setdefault(key, []).append((step, value, int(time.time() * 1000)))
                    continue
                self.charted.add(key)
                self._log_held(key)
            out[key] = value
        return out

    def _log_held(self, key: str) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        points = [Metric(key, value, stamp, step) for step, value, stamp in self.held.pop(key, [])]
        if points:
            MlflowClient().log_batch(str(self.run_id), metrics=points)

    def metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics outside a training step's (validation's), at `step`."""
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)}, step=step)

    def validation(self, step: int, score: Score, alarms: list[str]) -> None:
        """A validation at `step`: its metrics, and each decline alarm as the run's alarm tags."""
        self.metrics(step, score.metrics())
        for message in alarms:
            self.tags({"decline_alarm": "true", "decline_alarm_message": message[:5000]})

    def tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags(tags)

    def checkpoint_models(self, scores: list[Any], selected: int, model: Any, tokenizer: Any) -> None:
        """Each validated step as an MLflow LoggedModel (logged_models.py), at the end of training.

        A store that fails here warns rather than fails the stage: the policy and its reports are already
        written, and rerunning `grpo train` resumes at the last step and logs what is missing.
        """
        if not self.enabled or self.run_id is None:
            return
        import mlflow

        from pipelines.grpo import logged_models

        try:
            logged_models.log_checkpoints(self.cfg, self.paths, self.run_id, scores, selected, model, tokenizer)
        except (mlflow.exceptions.MlflowException, OSError) as exc:
            log.warning("could not log the checkpoints as MLflow models (%s); rerun `grpo train` to log them", exc)

    def fail(self, interrupted: bool) -> None:
        if self.enabled:
            import mlflow

            mlflow.end_run(status="KILLED" if interrupted else "FAILED")

    def finished(
        self, summary: dict[str, Any], scores: list[Score], model: Any, tokenizer: Any, curves: Path | None
    ) -> None:
        """The end of training, from reports/train.json's `summary`: the selected step, the task and its
        verifiers as tags, each validated step as a LoggedModel, the curves and the description; then
        the run closes."""
        if validation := summary["validation"]:
            share = f"{validation['time_share']:.3f}"
            self.tags({"selected_step": str(summary["selected_step"]), "validation_time_share": share})
        self.tags({"task": summary["task"], **{f"verifier/{k}": v for k, v in summary["verifiers"].items()}})
        self.checkpoint_models(scores, summary["selected_step"], model, tokenizer)
        self.finish(curves, summary)

    def finish(self, curves: Path | None, summary: dict[str, Any] | None = None) -> None:
        """Log the curves, describe what ran (from reports/train.json's `summary`) and close the run."""
        if not self.enabled:
            return
        import mlflow

        if curves is not None:
            mlflow.log_artifact(str(curves), "plots")
        if summary is not None:
            flat = sorted(self.held)
            note = f"\n- **not charted**: {', '.join(f'`{k}`' for k in flat)}, 0 at every step" if flat else ""
            mlflow.set_tag(NOTE, describe(self.cfg, self.paths, summary) + note)
        mlflow.end_run()


def describe(cfg: Config, paths: Paths, summary: dict[str, Any] | None = None) -> str:
    """The run's description, in Markdown: what was trained on which data, and (once done) what came out.

    `grpo register` appends the held-out test result and the registry decision below it.
    """
    t = cfg.train
    method = f"LoRA r={t.lora.r}" if t.lora.enabled else "full fine-tuning"
    lines = [
        f"**GRPO** on `{cfg.snapshot.source}` ({method}, loss `{t.loss_type}`), preset `{cfg.preset or 'none'}`.",
        "",
        f"- **data**: {_data_line(paths)}",
    ]
    per_step = f"{t.prompts_per_step} prompts x {t.num_generations} completions a step"
    if summary is None:
        lines.append(f"- **steps**: {t.steps} planned, {per_step} (running)")
        return "\n".join(lines)
    stopped = (summary.get("validation") or {}).get("stop_reason")
    lines.append(f"- **steps**: {summary.get('steps')} of {t.steps}, {per_step}" + (f"; {stopped}" if stopped else ""))
    lines.append(f"- **final step**: reward {_num(summary.get('reward'))}, KL {_num(summary.get('kl'), 4)}")
    validation = summary.get("validation")
    if validation:
        lines.append(
            f"- **selected step {summary.get('selected_step')}** (`train.select: {summary.get('select')}`): validation "
            f"accuracy {_num(_selected_accuracy(summary))}, reference {_num(validation.get('reference_accuracy'))}, "
            f"best {_num(validation.get('best_accuracy'))} at step {validation.get('best_step')}"
        )
        for alarm in validation.get("alarms") or []:
            lines.append(f"- **decline alarm**: {alarm.get('message', alarm)}")
    else:
        lines.append(f"- **selected step {summary.get('selected_step')}** (no validation split)")
    return "\n".join(lines)


def _selected_accuracy(summary: dict[str, Any]) -> float | None:
    """The validation accuracy of the step that left training (the best or the last evaluated one)."""
    validation = summary.get("validation") or {}
    for which in ("selected", "best", "last"):
        if validation.get(f"{which}_step") == summary.get("selected_step"):
            return validation.get(f"{which}_accuracy")
    return None


def _data_line(paths: Paths) -> str:
    """Where the rows came from and how many each split has, from reports/validation.json."""
    try:
        report = json.loads(paths.validation_report.read_text())
    except (OSError, ValueError):
        return "see the run's dataset input"
    counts = ", ".join(
        f"{report[f'{split}_rows']} {split}" for split in ("train", "val", "eval") if f"{split}_rows" in report
    )
    return f"`{report.get('source', '?')}`, {counts} rows (digest `{str(report.get('digest', '?'))[:12]}`)"


def _num(value: Any, digits: int = 3) -> str:
    return "-" if not isinstance(value, (int, float)) or math.isnan(value) else f"{value:.{digits}f}"


@contextmanager
def _system_metrics_settings() -> Iterator[None]:
    """While the run starts: MLflow's system-metrics monitor samples every SYSTEM_METRICS_INTERVAL_S (unless
    the user set MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) and keeps its start and stop notices off the console."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    key = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
    if key in os.environ:
        yield
        return
    os.environ[key] = str(SYSTEM_METRICS_INTERVAL_S)
    try:
        yield
    finally:
        os.environ.pop(key, None)


def completions_markdown(table: dict[str, list[Any]]) -> str:
    """One step's sample completions in full, as Markdown (what the completions table's cells cut short).

    >>> print(completions_markdown({"step": [3], "reward": [1.0], "advantage": [0.707], "prompt": ["What is 2 + 3?"],
    ...                             "completion": ["2 + 3 = 5. #### 5"]}))
    ### Step 3
    <BLANKLINE>
    **1.** reward 1.000, advantage +0.707: What is 2 + 3?
    <BLANKLINE>
    ```text
    2 + 3 = 5. #### 5
    ```
    <BLANKLINE>
    """
    lines = [f"### Step {table['step'][0]}", ""]
    for i, text in enumerate(table["completion"]):
        advantage = table["advantage"][i]
        shown = "-" if advantage is None else f"{advantage:+.{DECIMALS}f}"
        reward = table["reward"][i]
        lines.append(f"**{i + 1}.** reward {_num(reward, DECIMALS)}, advantage {shown}: {table['prompt'][i]}")
        lines += ["", "```text", text, "```", ""]
    return "\n".join(lines)


def _rounded(value: float) -> float | None:
    """A table number: rounded to DECIMALS, None (a blank cell) for NaN."""
    return None if math.isnan(value) else round(value, DECIMALS)


def _last_user_turn(prompt: Any) -> str:
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt)


@contextmanager
def _no_artifact_progress_bar() -> Iterator[None]:
    """MLflow's artifact progress bar off for one call, unless the user set it.

    `log_table` appends to the run's table by downloading it first, and MLflow draws a
    "Downloading artifacts" bar for that at every step, between the lines of the training bar.
    """
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)
