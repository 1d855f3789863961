"""Validation during training: is the policy getting better at the task, or only at the reward?

Reward curves rise while held-out skill can fall (the policy learns the answer format, then loses
arithmetic). So training scores the validation split (data/validated/val.jsonl) greedily before
the first step, every `train.eval_every` steps and after the last, on the sampling copy (batched,
no gradients), and keeps:
- the best step (strict accuracy, ties to the earlier one; step 0, the reference, is the baseline
  and never "best") and the selected step, whose trainable weights wait in checkpoints/best/ for
  `train.select: best`: the latest step within `train.select_tolerance` standard errors of the
  best. On a few dozen problems the best score is partly luck (the maximum of noisy scores favours
  a lucky step, often an early one), so a later step that is as good within the noise is preferred;
  a real decline falls outside the tolerance and is still avoided. 0 = the best itself;
- the evaluations without improvement since, for `train.early_stopping_patience`;
- a decline alarm when training reward rose while validation accuracy fell over
  `train.decline_window` evaluations, or when lenient accuracy (the last number is right, any
  format) falls below the reference's; in both, by more than `train.decline_tolerance` standard
  errors, so that a problem or two of noise on a small split does not sound it.
The judge is evaluation's (the task's, verifiers/task.py), with evaluation's decoding length, so
validation predicts what `evaluate` will see on the test split.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.generation.multi_turn import Environment
from pipelines.generation.rollout import generate
from pipelines.verifiers.judge import judge_all
from pipelines.verifiers.task import Task


@dataclass
class Score:
    """One evaluation of the policy on the validation split."""

    step: int
    accuracy: float  # greedy, the task's strict verdict (math: the final `#### N` line is right)
    lenient_accuracy: float  # the task's lenient reading (math: the last number in the text is right)
    format_rate: float
    seconds: float
    reward: float | None = None  # mean training reward over the steps since the previous evaluation
    problems: int = 0  # validation rows scored (0 in states saved before it was kept)

    def metrics(self) -> dict[str, float]:
        """As logged to MLflow (TRL's `eval/` prefix)."""
        return {
            "eval/accuracy": self.accuracy,
            "eval/lenient_accuracy": self.lenient_accuracy,
            "eval/format_rate": self.format_rate,
            "eval/seconds": self.seconds,
        }


def score_split(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    step: int,
    max_new_tokens: int,
    batch_size: int,
    backend: str = "lean",
    judge_timeout: float = 30.0,
    task: Task | None = None,
) -> Score:
    """Greedy answers to every row, judged by the task's judge: strict, lenient and for format."""
    if task is None:
        from pipelines.verifiers.math_task import TASK as task
    started = time.perf_counter()
    correct = lenient = formatted = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        rollout = generate(
            model, tokenizer, [r["prompt"] for r in chunk], num_generations=1, max_new_tokens=max_new_tokens,
            do_sample=False, backend=backend, environment=Environment.of(task),  # the task's tools, if any
        )  # fmt: skip
        # In the verifier worker, under evaluation's limit: model output is hostile text.
        verdicts = judge_all(rollout.texts, chunk, task=task, timeout=judge_timeout)
        for verdict in verdicts:
            correct += verdict["correct"]
            lenient += verdict["lenient"]
            formatted += verdict["format"]
    n = max(len(rows), 1)
    return Score(step, correct / n, lenient / n, formatted / n, time.perf_counter() - started, problems=len(rows))


@dataclass
class Watch:
    """The evaluations so far and what follows from them; checkpointed with the trainer's state."""

    window: int = 3
    tolerance: float = 0.0  # train.select_tolerance, in standard errors of the best accuracy
    alarm_tolerance: float = 0.0  # train.decline_tolerance: how far below, in standard errors, is a fall
    scores: list[Score] = field(default_factory=list)
    alarms: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None

    @property
    def best(self) -> Score | None:
        """The trained step with the best accuracy; the earlier one on a tie."""
        trained = [s for s in self.scores if s.step > 0]
        return max(trained, key=lambda s: (s.accuracy, -s.step)) if trained else None

    @property
    def selected(self) -> Score | None:
        """The latest trained step within `tolerance` standard errors of the best (ties included);
        the best itself when the tolerance is 0.

        It changes only to the step just scored (a new best, or a later one within the tolerance of
        the best), so the weights saved at that moment are the selected step's.
        """
        best = self.best
        if best is None or self.tolerance <= 0 or best.problems <= 0:
            return best
        margin = self.tolerance * standard_error(best.accuracy, best.problems)
        close = [s for s in self.scores if s.step > 0 and s.accuracy >= best.accuracy - margin - 1e-12]
        return max(close, key=lambda s: s.step)

    @property
    def reference(self) -> Score | None:
        return self.scores[0] if self.scores and self.scores[0].step == 0 else None

    def since_best(self) -> int:
        """Evaluations after the best one (0 when the latest is the best)."""
        best = self.best
        return 0 if best is None else sum(1 for s in self.scores if s.step > best.step)

    def add(self, score: Score) -> list[str]:
        """Record a score; return the alarms it raises (each said once when its condition starts)."""
        self.scores.append(score)
        said = []
        previous = self._previous_step()
        for kind, message in (("reward_up_accuracy_down", self._decline()), ("lenient_below_reference", self._lost())):
            was_on = any(a["kind"] == kind and a["step"] == previous for a in self.alarms)
            if message:
                self.alarms.append({"step": score.step, "kind": kind, "message": message})
                if not was_on:
                    said.append(message)
        return said

    def should_stop(self, patience: int | None) -> bool:
        if patience is None or self.best is None or self.since_best() < patience:
            return False
        best = self.best
        self.stop_reason = (
            f"early stop at step {self.scores[-1].step}: validation accuracy has not beaten step {best.step}'s "
            f"{best.accuracy:.3f} in {patience} evaluations (train.early_stopping_patience={patience})"
        )
        return True

    def _previous_step(self) -> int | None:
        return self.scores[-2].step if len(self.scores) > 1 else None

    def _decline(self) -> str | None:
        recent = [s for s in self.scores if s.reward is not None][-self.window :]
        if len(recent) < self.window:
            return None
        first, last = recent[0], recent[-1]
        margin = self.alarm_tolerance * standard_error(first.accuracy, first.problems)
        if not (last.reward > first.reward and last.accuracy < first.accuracy - margin):  # type: ignore[operator]
            return None
        return (
            f"decline alarm at step {last.step}: over the last {self.window} evaluations (steps {first.step}-"
            f"{last.step}) training reward rose {first.reward:.3f} -> {last.reward:.3f} while validation accuracy "
            f"fell {first.accuracy:.3f} -> {last.accuracy:.3f}"
            f"{fall_size(first.accuracy, last.accuracy, first.problems)}"
            ": the policy is learning the reward, not the task. "
            "train.select=best keeps the best step; lower train.learning_rate or raise train.beta to keep the gains"
        )

    def _lost(self) -> str | None:
        ref, last = self.reference, self.scores[-1]
        if ref is None or last.step == 0:
            return None
        margin = self.alarm_tolerance * standard_error(ref.lenient_accuracy, ref.problems)
        if last.lenient_accuracy >= ref.lenient_accuracy - margin:
            return None
        return (
            f"decline alarm at step {last.step}: lenient validation accuracy (the task's looser reading) "
            f"{last.lenient_accuracy:.3f} is below the reference's {ref.lenient_accuracy:.3f}"
            f"{fall_size(ref.lenient_accuracy, last.lenient_accuracy, ref.problems)}: the policy has lost "
            "skill the base model had; lower train.learning_rate or raise train.beta"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "scores": [asdict(s) for s in self.scores],
            "alarms": self.alarms,
            "stop_reason": self.stop_reason,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any] | None, window: int, tolerance: float = 0.0, alarm_tolerance: float = 0.0
    ) -> Watch:
        if not state:
            return cls(window=window, tolerance=tolerance, alarm_tolerance=alarm_tolerance)
        return cls(
            window=window,
            tolerance=tolerance,
            alarm_tolerance=alarm_tolerance,
            scores=[Score(**s) for s in state["scores"]],
            alarms=list(state["alarms"]),
            stop_reason=state.get("stop_reason"),
        )

    def summary(self, total_step_seconds: float) -> dict[str, Any]:
        """What metrics/train.json says about validation."""
        spent = sum(s.seconds for s in self.scores)
        best, ref, chosen = self.best, self.reference, self.selected
        return {
            "evaluations": len(self.scores),
            "best_step": best.step if best else None,
            "best_accuracy": best.accuracy if best else None,
            "selected_step": chosen.step if chosen else None,
            "selected_accuracy": chosen.accuracy if chosen else None,
            "select_tolerance": self.tolerance,
            "decline_tolerance": self.alarm_tolerance,
            "last_step": self.scores[-1].step if self.scores else None,
            "last_accuracy": self.scores[-1].accuracy if self.scores else None,
            "reference_accuracy": ref.accuracy if ref else None,
            "reference_lenient_accuracy": ref.lenient_accuracy if ref else None,
            "seconds": spent,
            # Validation's cost against training's: what `eval_every` buys its curve with.
            "time_share": spent / (spent + total_step_seconds) if spent + total_step_seconds > 0 else 0.0,
            "alarms": self.alarms,
            "stop_reason": self.stop_reason,
        }


def fall_size(before: float, after: float, problems: int) -> str:
    """How big a fall is, in problems and standard errors, so a reader can tell noise from a decline.

    >>> fall_size(0.871, 0.806, 31)
    ' (2 of 31 problems, 1.1 standard errors)'
    >>> fall_size(0.7, 0.5, 0)
    ''
    """
    error = standard_error(before, problems)
    if not error:
        return ""
    fallen = round((before - after) * problems)
    return f" ({fallen} of {problems} problems, {(before - after) / error:.1f} standard errors)"


def standard_error(accuracy: float, problems: int) -> float:
    """sqrt(p(1-p)/n): the noise of an accuracy measured on n problems (0 when n is unknown).

    >>> round(standard_error(0.4, 64), 3)
    0.061
    """
    return (accuracy * (1 - accuracy) / problems) ** 0.5 if problems > 0 else 0.0


def mean_reward_since(history: list[dict[str, float]], step: int) -> float | None:
    """Mean training reward of the steps after `step` (None when there are none).

    >>> mean_reward_since([{"step": 1, "reward": 0.2}, {"step": 2, "reward": 0.4}], 1)
    0.4
    """
    rewards = [h["reward"] for h in history if h["step"] > step]
    return sum(rewards) / len(rewards) if rewards else None
