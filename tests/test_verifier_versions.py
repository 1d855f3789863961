"""Versioned verifiers: golden cases pin every verifier's scores; the version hash follows its code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipelines.verifiers import catalog, rewards, versions
from pipelines.verifiers.task import Reward

ROOT = Path(__file__).resolve().parents[1]
CASES = [(name, i, case) for name, cases in versions.golden_cases().items() for i, case in enumerate(cases)]


@pytest.mark.parametrize(("name", "index", "case"), CASES, ids=[f"{n}-{i}" for n, i, _ in CASES])
def test_golden_case_keeps_its_score(name, index, case):
    got = versions.score(name, case)
    assert got == case["expected"], (
        f"verifier {name!r} now scores golden case {index} ({case['completion']!r}) {got!r}, not "
        f"{case['expected']!r}. If the change is intended, update pipelines/verifiers/golden.json: the "
        f"version hash (pipelines/verifiers/versions.py) changes with it, and scores recorded under the "
        f"old hash are no longer comparable (the champion is re-scored with today's verifiers)."
    )


def test_every_generic_reward_has_golden_cases():
    assert set(versions.golden_cases()) == set(rewards.REWARDS)


@pytest.mark.parametrize("name", sorted(catalog.BUILTIN))
def test_version_is_stable_and_distinct_per_verifier(name):
    task = catalog.load(name, ROOT)
    names = [*task.reward_names, *rewards.REWARDS, "judge"]
    first, again = versions.verifier_versions(task, names), versions.verifier_versions(task, names)
    names += ["tools"] if task.tools else []  # a task's tools are versioned beside its rewards
    assert first == again and len(set(first.values())) == len(names)
    assert all(len(h) == 64 for h in first.values())


def test_changed_verifier_source_changes_the_hash(tmp_path, monkeypatch):
    math, countdown = catalog.load("math", ROOT), catalog.load("countdown", ROOT)
    both = lambda: {**versions.verifier_versions(math, ["accuracy", "judge"]),  # noqa: E731
                    "countdown": versions.verifier_versions(countdown, ["countdown"])["countdown"]}  # fmt: skip
    before = both()
    # A dependency module changes (math_answer.py, read by every one of them)...
    original, copy = versions.HERE, tmp_path / "verifiers"
    copy.mkdir()
    for path in original.glob("*.py"):
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "golden.json").write_bytes(versions.GOLDEN.read_bytes())
    (copy / "math_answer.py").write_text((copy / "math_answer.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(versions, "HERE", copy)
    monkeypatch.setattr(versions, "GOLDEN", copy / "golden.json")
    changed = both()
    assert all(changed[n] != before[n] for n in before)
    # ...and a module none of them reads does not move them.
    (copy / "math_answer.py").write_bytes((original / "math_answer.py").read_bytes())
    (copy / "unrelated.py").write_text("X = 1\n")
    assert both() == before
    # The function's own source and the golden cases count too.
    other = dataclasses.replace(
        math, rewards=[Reward("accuracy", lambda prompts, completions, **_: [0.0]), math.rewards[1]]
    )
    assert versions.verifier_versions(other, ["accuracy"])["accuracy"] != before["accuracy"]
    fewer = dataclasses.replace(math, golden=math.golden[:1])
    assert versions.verifier_versions(fewer, ["judge"])["judge"] != before["judge"]


def test_dependencies_follow_imports():
    assert {p.name for p in versions.dependencies("rewards")} == {"rewards.py", "countdown.py", "math_answer.py"}
    assert {p.name for p in versions.dependencies("judge")} == {"judge.py", "math_answer.py", "runner.py", "task.py"}


def test_train_and_evaluate_go_stale_when_verifier_code_changes():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in ("train", "evaluate"):
        assert "pipelines/verifiers" in stages[stage]["deps"], stage
    outs = [o if isinstance(o, str) else next(iter(o)) for o in stages["train"]["outs"]]
    assert "ledger" in outs
    assert stages["train"]["outs"][outs.index("ledger")]["ledger"] == {"persist": True}


def test_gate_says_when_the_champion_was_re_scored_with_todays_verifiers():
    from pipelines.config import EvaluateConfig, RegisterConfig
    from pipelines.registry.gate import Evidence, decide
    from pipelines.registry.stage import verifier_tags

    today = versions.verifier_versions(catalog.load("math", ROOT), ["judge"])
    base = dict(candidate=[True] * 8, reference=[False] * 8, champion=[False] * 8, candidate_format_rate=1.0)
    same = decide(Evidence(**base, champion_version="3", verifiers=today, champion_verifiers=today), RegisterConfig(),
                  EvaluateConfig())  # fmt: skip
    assert "re-scored" not in same.reason and same.reason.startswith("vs champion v3:")
    for recorded in ({"judge": "0" * 64}, None):  # other code, or none recorded (registered before hashes)
        other = decide(
            Evidence(**base, champion_version="3", verifiers=today, champion_verifiers=recorded),
            RegisterConfig(),
            EvaluateConfig(),
        )
        assert f"champion re-scored with today's verifiers (judge={today['judge'][:8]})" in other.reason
        assert other.promote == same.promote
    tags = verifier_tags({"verifiers": {"accuracy": "a" * 64}}, {"verifiers": today}, {})
    assert tags == {"verifier_accuracy_sha256": "a" * 64, "verifier_judge_sha256": today["judge"]}
