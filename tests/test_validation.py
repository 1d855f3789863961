"""Validation during training: the best step is kept, training stops when nothing more is learned,
and a rising reward with falling held-out skill raises an alarm; exact resume holds with all of it."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from pipelines.grpo import trainer
from pipelines.grpo.validation import Score, Watch
from pipelines.paths import Paths
from tests.conftest import prepared_project


def _score(step: int, accuracy: float, reward: float | None = None, lenient: float | None = None) -> Score:
    return Score(step, accuracy, accuracy if lenient is None else lenient, 1.0, 0.5, reward)


def test_best_is_the_earliest_of_equal_scores_and_never_the_reference():
    watch = Watch()
    watch.add(_score(0, 0.9))  # the reference: a baseline, not a candidate
    assert watch.best is None and watch.since_best() == 0
    for step, acc in ((2, 0.4), (4, 0.6), (6, 0.6), (8, 0.5)):
        watch.add(_score(step, acc, reward=0.5))
    assert watch.best.step == 4 and watch.since_best() == 2
    assert not watch.should_stop(3) and not watch.should_stop(None)
    assert watch.should_stop(2) and "step 4's 0.600 in 2 evaluations" in watch.stop_reason


def test_selection_prefers_a_later_step_within_the_tolerance_and_avoids_a_real_decline():
    def scored(step: int, accuracy: float) -> Score:
        return Score(step, accuracy, accuracy, 1.0, 0.5, 0.5, problems=64)

    # On 64 problems one standard error at 0.40 is sqrt(0.4 * 0.6 / 64) = 0.061: steps 10 and 15 are
    # as good within the noise, step 20 (0.30) is a decline outside it.
    script = [(0, 0.2), (5, 0.40), (10, 0.34), (15, 0.36), (20, 0.30)]
    strict, tolerant = Watch(tolerance=0.0), Watch(tolerance=1.0)
    picked = []
    for step, acc in script:
        strict.add(scored(step, acc))
        before = tolerant.selected
        score = scored(step, acc)
        tolerant.add(score)
        # The selection only ever moves to the step just scored, whose weights are then saved.
        assert tolerant.selected is before or tolerant.selected is score
        picked.append(tolerant.selected.step if tolerant.selected else None)
    assert strict.selected.step == strict.best.step == 5
    assert tolerant.best.step == 5 and picked == [None, 5, 10, 15, 15]
    assert Watch(tolerance=2.0, scores=[scored(s, a) for s, a in script]).selected.step == 20
    summary = tolerant.summary(10.0)
    assert (summary["best_step"], summary["selected_step"], summary["select_tolerance"]) == (5, 15, 1.0)
    # Scores saved before `problems` was kept carry 0: no standard error, the best itself.
    assert Watch(tolerance=1.0, scores=[_score(5, 0.4), _score(10, 0.39)]).selected.step == 5


def test_decline_alarm_is_said_once_with_its_numbers():
    watch = Watch(window=3)
    watch.add(_score(0, 0.5, lenient=0.6))
    assert watch.add(_score(2, 0.7, reward=0.2, lenient=0.7)) == []
    assert watch.add(_score(4, 0.6, reward=0.3, lenient=0.7)) == []
    said = watch.add(_score(6, 0.5, reward=0.4, lenient=0.7))  # reward 0.2 -> 0.4, accuracy 0.7 -> 0.5
    assert len(said) == 1 and "reward rose 0.200 -> 0.400" in said[0] and "fell 0.700 -> 0.500" in said[0]
    assert watch.add(_score(8, 0.45, reward=0.5, lenient=0.7)) == []  # still on: not said again
    lost = watch.add(_score(10, 0.6, reward=0.4, lenient=0.55))
    assert len(lost) == 1 and "0.550 is below the reference's 0.600" in lost[0]
    kinds = [a["kind"] for a in watch.alarms]
    assert kinds.count("reward_up_accuracy_down") == 2 and kinds.count("lenient_below_reference") == 1
    restored = Watch.from_state(json.loads(json.dumps(watch.state_dict())), window=3)
    assert restored.state_dict() == watch.state_dict() and restored.best.step == watch.best.step


def test_decline_alarm_stays_quiet_on_a_fall_within_the_noise():
    def scored(step: int, accuracy: float, reward: float | None, lenient: float) -> Score:
        return Score(step, accuracy, lenient, 1.0, 0.5, reward, problems=64)

    # One standard error on 64 problems: 0.060 at 0.38 (validation) and 0.059 at 0.33 (reference).
    # A fall of 2 problems (0.031) and a lenient dip of 3 (0.047) are noise; 5 problems (0.078) is not.
    quiet, loud = Watch(window=3, alarm_tolerance=1.0), Watch(window=3, alarm_tolerance=0.0)
    script = [
        (0, 0.33, None, 0.33),
        (5, 0.381, 0.37, 0.381),
        (10, 0.36, 0.45, 0.283),
        (15, 0.35, 0.53, 0.35),
    ]
    for step, acc, reward, lenient in script:
        quiet.add(scored(step, acc, reward, lenient))
        loud.add(scored(step, acc, reward, lenient))
    assert quiet.alarms == []
    assert sorted({a["kind"] for a in loud.alarms}) == ["lenient_below_reference", "reward_up_accuracy_down"]
    # Lenient 0.25 is 5 problems below the reference's 0.33; strict 0.36 -> 0.33 is still noise.
    said = quiet.add(scored(20, 0.33, 0.60, 0.25))
    assert [a["kind"] for a in quiet.alarms] == ["lenient_below_reference"] and len(said) == 1
    assert "0.250 is below the reference's 0.330 (5 of 64 problems, 1.4 standard errors)" in said[0]
    said = quiet.add(scored(25, 0.27, 0.65, 0.27))  # steps 15-25: 0.35 -> 0.27, 5 problems
    assert len(said) == 1 and "fell 0.350 -> 0.270 (5 of 64 problems, 1.3 standard errors)" in said[0]
    assert quiet.summary(1.0)["decline_tolerance"] == 1.0
    restored = Watch.from_state(quiet.state_dict(), window=3, alarm_tolerance=1.0)
    assert restored.alarm_tolerance == 1.0 and restored.alarms == quiet.alarms


def test_score_split_judges_greedy_answers_strict_lenient_and_format(tiny_reference, monkeypatch):
    """The real decoding path (generate on a backend) and the evaluation judge, with fixed answers."""
    from transformers import AutoTokenizer

    from pipelines.generation import backends
    from pipelines.grpo.validation import score_split

    tokenizer = AutoTokenizer.from_pretrained(tiny_reference)
    answer = tokenizer.encode("so 4\n#### 4", add_special_tokens=False) + [tokenizer.eos_token_id]

    class Fixed:
        calls = 0

        def completions(self, model, tokenizer, input_ids, attention_mask, request):
            assert not request.do_sample and request.num_generations == 1
            Fixed.calls += 1
            return backends.Sampled(torch.tensor([answer] * input_ids.size(0)))

    monkeypatch.setitem(backends.BACKENDS, "fixed", Fixed())
    rows = [{"prompt": f"q{i}", "answer": a} for i, a in enumerate(["4", "5", "4.0", "7"])]
    score = score_split(None, tokenizer, rows, step=3, max_new_tokens=8, batch_size=3, backend="fixed")
    assert (score.step, score.accuracy, score.lenient_accuracy, score.format_rate) == (3, 0.5, 0.5, 1.0)
    assert score.problems == 4  # what the selection tolerance's standard error is computed over
    assert Fixed.calls == 2  # batches of 3


# A reward that varies between completions of a random model, so the weights really move.
MOVING = [
    "train.learning_rate=0.01",
    "train.rewards=[{name: length, weight: 1.0, params: {target_chars: 30}}]",
    "data.val_fraction=0.2",
    "data.max_val_rows=4",
    "train.eval_every=2",
]
# Validation accuracy by step: best at step 2, then a decline while the (scripted) reward rises.
SCRIPT = {0: 0.25, 2: 0.75, 4: 0.5, 6: 0.25, 8: 0.0}


@pytest.fixture
def scripted(monkeypatch):
    """Validation scores from SCRIPT (a decline that a tiny random model cannot show by itself);
    everything else (selection, checkpoints, early stop, logging) is the real trainer."""
    calls: list[int] = []

    def fake(model, tokenizer, rows, *, step, **_):
        calls.append(step)
        return Score(step, SCRIPT[step], SCRIPT[step], 1.0, 0.01)

    monkeypatch.setattr(trainer, "score_split", fake)
    return calls


def test_best_step_is_the_policy_and_early_stop_ends_training(tmp_path, tiny_reference, scripted):
    root = tmp_path / "p"
    cfg = prepared_project(root, tiny_reference, [*MOVING, "train.steps=10", "train.early_stopping_patience=3"])
    result = trainer.run(cfg, Paths(root), log_to_mlflow=True)
    paths = Paths(root)
    assert scripted == [0, 2, 4, 6, 8] and result.steps == 8  # stopped 3 evaluations after step 2
    summary = json.loads(paths.train_summary.read_text())
    assert summary["selected_step"] == 2 and summary["select"] == "best"
    validation = summary["validation"]
    assert validation["best_step"] == 2 and validation["best_accuracy"] == 0.75 and validation["last_accuracy"] == 0.0
    assert "early stop at step 8" in validation["stop_reason"] and 0 < validation["time_share"] < 1
    # The adapter that leaves `train` is step 2's, not step 8's.
    best = load_file(str(paths.checkpoints_dir / "best" / "trainable.safetensors"))
    policy = load_file(str(paths.policy_dir / "adapter_model.safetensors"))
    last = load_file(str(paths.checkpoints_dir / "step-000008" / "trainable.safetensors"))
    lora_b = [k for k in best if "lora_B" in k]
    assert lora_b and any((best[k] != last[k]).any() for k in lora_b), "steps 2 and 8 equal: the test proves nothing"
    for name, tensor in best.items():
        key = name.replace(".default", "")  # peft's file names drop the adapter's name
        assert torch.equal(policy[key], tensor), name
    rows = list(csv.DictReader(paths.val_plot.read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6, 8]
    assert [float(r["accuracy"]) for r in rows] == [SCRIPT[s] for s in (0, 2, 4, 6, 8)]

    from mlflow import MlflowClient

    from pipelines.mlflow_store import tracking_uri

    client = MlflowClient(tracking_uri(root))
    run = client.get_run(summary["mlflow_run_id"])
    logged = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert [(m.step, m.value) for m in logged] == [(s, SCRIPT[s]) for s in (0, 2, 4, 6, 8)]
    assert run.data.tags["selected_step"] == "2" and "early stop" in run.data.tags["stop_reason"]


def test_the_alarm_fires_when_reward_rises_and_accuracy_falls(tmp_path, tiny_reference, scripted, monkeypatch):
    from pipelines.grpo import validation

    # The length reward of a random model wanders; script it to rise so only accuracy decides.
    monkeypatch.setattr(trainer, "mean_reward_since", lambda history, step: step / 100)
    assert validation.mean_reward_since([{"step": 1, "reward": 1.0}], 0) == 1.0  # the real one, untouched
    root = tmp_path / "p"
    cfg = prepared_project(root, tiny_reference, [*MOVING, "train.steps=8", "train.select=last"])
    trainer.run(cfg, Paths(root), log_to_mlflow=False)
    summary = json.loads(Paths(root).train_summary.read_text())
    assert summary["selected_step"] == 8  # select: last
    alarms = summary["validation"]["alarms"]
    assert alarms and alarms[0]["kind"] == "reward_up_accuracy_down" and alarms[0]["step"] == 6
    assert "fell 0.750 -> 0.250" in alarms[0]["message"]
    lost = [a for a in alarms if a["kind"] == "lenient_below_reference"]
    assert [a["step"] for a in lost] == [8]  # lenient 0.25 at step 6 ties the reference; 0.0 at 8 is below


def test_resume_with_best_selection_and_early_stop_equals_uninterrupted(
    tmp_path, tiny_reference, scripted, monkeypatch
):
    from pipelines.grpo import run_logger

    overrides = [*MOVING, "train.steps=10", "train.checkpoint_every=2", "train.early_stopping_patience=3"]
    straight = tmp_path / "straight"
    trainer.run(prepared_project(straight, tiny_reference, overrides), Paths(straight), log_to_mlflow=False)
    expected = load_file(str(Paths(straight).policy_dir / "adapter_model.safetensors"))

    stopped = tmp_path / "stopped"
    cfg = prepared_project(stopped, tiny_reference, overrides)
    original = run_logger.RunLogger.step

    def crash_at_five(self, step, *args, **kwargs):
        if step == 5:
            raise KeyboardInterrupt  # after step 4's checkpoint and validation, before step 5's
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(run_logger.RunLogger, "step", crash_at_five)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(cfg, Paths(stopped), log_to_mlflow=False)
    monkeypatch.setattr(run_logger.RunLogger, "step", original)
    scripted.clear()
    result = trainer.run(cfg, Paths(stopped), log_to_mlflow=False)
    assert result.resumed_from == 4 and result.steps == 8
    assert scripted == [6, 8]  # the evaluations before the crash came back with the checkpoint
    got = load_file(str(Paths(stopped).policy_dir / "adapter_model.safetensors"))
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    mine, theirs = (json.loads(Paths(p).train_summary.read_text()) for p in (stopped, straight))
    assert mine["selected_step"] == theirs["selected_step"] == 2
    drop = ("seconds", "time_share")
    assert {k: v for k, v in mine["validation"].items() if k not in drop} == {
        k: v for k, v in theirs["validation"].items() if k not in drop
    }


def test_the_prefect_training_artifact_says_which_step_left_and_why():
    from tasks.stages import _validation_text

    final = {
        "select": "best",
        "selected_step": 2,
        "validation": {
            "evaluations": 5, "time_share": 0.12, "reference_accuracy": 0.25, "best_step": 2, "best_accuracy": 0.75,
            "last_step": 8, "last_accuracy": 0.0, "stop_reason": "early stop at step 8: ...",
            "alarms": [{"step": 6, "kind": "reward_up_accuracy_down", "message": "decline alarm at step 6: ..."}],
        },
    }  # fmt: skip
    text = _validation_text(final)
    assert "the policy is step **2** (train.select=best)" in text and "12% of training time" in text
    assert "early stop at step 8" in text and "> ⚠ decline alarm at step 6" in text
    assert _validation_text({"steps": 3}) == ""
    later = {**final, "selected_step": 4}
    later["validation"] = {**final["validation"], "select_tolerance": 1.0, "selected_step": 4}
    assert "step **4** (train.select=best; within 1 standard error(s) of the best" in _validation_text(later)


def test_a_later_step_within_the_tolerance_leaves_train_with_its_own_weights(tmp_path, tiny_reference, monkeypatch):
    """Step 2 is the best; step 4 is one problem below it on 8 problems (within one standard error,
    0.153), steps 6 and 8 fall further: step 4 leaves `train`, with step 4's weights."""
    script = {0: 0.25, 2: 0.75, 4: 0.625, 6: 0.5, 8: 0.25}
    monkeypatch.setattr(
        trainer,
        "score_split",
        lambda model, tokenizer, rows, *, step, **_: Score(step, script[step], script[step], 1.0, 0.01, problems=8),
    )
    root = tmp_path / "p"
    cfg = prepared_project(
        root,
        tiny_reference,
        [*MOVING, "train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=10", "train.select_tolerance=1"],
    )
    assert cfg.train.select_tolerance == 1.0
    trainer.run(cfg, Paths(root), log_to_mlflow=False)
    paths = Paths(root)
    summary = json.loads(paths.train_summary.read_text())
    assert summary["selected_step"] == 4 and summary["validation"]["best_step"] == 2
    step4 = load_file(str(paths.checkpoints_dir / "step-000004" / "trainable.safetensors"))
    step2 = load_file(str(paths.checkpoints_dir / "step-000002" / "trainable.safetensors"))
    policy = load_file(str(paths.policy_dir / "adapter_model.safetensors"))
    lora_b = [k for k in step4 if "lora_B" in k]
    assert lora_b and any((step4[k] != step2[k]).any() for k in lora_b), "steps 2 and 4 equal: proves nothing"
    for name, tensor in step4.items():
        assert torch.equal(policy[name.replace(".default", "")], tensor), name
