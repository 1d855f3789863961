"""Tasks: each built-in task's judge and correctness reward agree, on golden cases and on many
completions; a user's task loads from a file; wrong combinations are refused loudly."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import pytest

from pipelines import config
from pipelines.config import ConfigError, GeneratorConfig, RewardSpec
from pipelines.grpo.reward_runner import RewardError, score
from pipelines.verifiers import catalog
from pipelines.verifiers.judge import judge_all
from pipelines.verifiers.task import TaskError, golden_problems

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "fixtures" / "even_task.py"
BUILTIN = sorted(catalog.BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
def test_golden_cases_agree_with_the_judge_and_the_rewards(name):
    task = catalog.load(name, ROOT)
    assert len(task.golden) >= 3 and golden_problems(task) == []
    catalog.check_golden(task, timeout=30, knob="t")  # the same, in the verifier worker


def _completions(name: str, row: dict, rng: random.Random) -> list[str]:
    """Right, wrong and malformed completions for one generated row."""
    right = row["solution"] if name == "countdown" else row["answer"]
    others = {
        "math": lambda: str(int(row["answer"]) + 1),
        "calculator": lambda: str(int(row["answer"]) + 1),
        "countdown": lambda: row["answer"],
        "choice": lambda: "Z",
    }
    others = others[name]()
    return [
        f"work\n#### {right}",
        f"#### {others}",  # countdown: the target restated
        f"\\boxed{{{right}}}",
        f"#### {right}\nmore text",
        str(right),
        f"<answer>{right}</answer>",
        f"#### {right}{rng.choice(['.', ' ', '!', ''])}",
    ]


@pytest.mark.parametrize("name", BUILTIN)
def test_judge_and_correctness_reward_agree_on_generated_problems(name):
    """What training rewards is what evaluation judges: the correctness reward is 1.0 exactly
    where the judge says correct, on every task's own data and many kinds of completion."""
    task = catalog.load(name, ROOT)
    rows = list(task.generate(GeneratorConfig(num_rows=40, operators=["+", "-", "*"])))
    rng = random.Random(0)
    texts, expanded = [], []
    for row in rows:
        assert task.check_row(row) is None, row
        for text in _completions(name, row, rng):
            texts.append(text)
            expanded.append(row)
    verdicts = judge_all(texts, expanded, task=task, timeout=30)
    spec = RewardSpec(name=task.correctness)
    rewards, _ = score([spec], [{**r, "prompt": "q"} for r in expanded], texts, 1, timeout=30, task=task)
    judged = [v["correct"] for v in verdicts]
    assert judged == [bool(v == 1.0) for v in rewards[:, 0].tolist()]
    assert 0 < sum(judged) < len(judged)  # both verdicts happen: the comparison means something
    # The first completion of every row is a right answer in the asked-for form.
    assert all(judged[i] for i in range(0, len(texts), len(texts) // len(rows)))


def test_countdown_restated_target_scores_zero_in_both():
    task = catalog.load("countdown", ROOT)
    rows = list(task.generate(GeneratorConfig(num_rows=30)))
    texts = [f"#### {r['answer']}" for r in rows]
    assert not any(v["correct"] or v["format"] for v in judge_all(texts, rows, task=task, timeout=30))
    rewards, _ = score(task_specs(task), [{**r, "prompt": "q"} for r in rows], texts, 1, timeout=30, task=task)
    assert rewards.abs().sum() == 0


def task_specs(task):
    return [RewardSpec(name=r.name, weight=r.weight) for r in task.rewards]


def test_choice_reads_letters_and_the_lenient_reading_takes_the_option_text():
    task = catalog.load("choice", ROOT)
    row = {"options": ["54", "56", "63", "48"], "answer": "B"}
    got = judge_all(["#### (b)", "#### 56", "#### C", "#### B. 56"], [row] * 4, task=task, timeout=30)
    assert [(v["correct"], v["format"], v["lenient"]) for v in got] == [
        (True, True, True), (False, False, True), (False, True, False), (False, False, True)
    ]  # fmt: skip


def test_another_tasks_reward_is_refused_and_a_missing_correctness_reward_is_said():
    countdown = catalog.load("countdown", ROOT)
    cfg = config.resolve({}, ["task=countdown", "train.rewards=[{name: accuracy}]"])
    with pytest.raises(TaskError, match="'accuracy', a reward of the math task, but task is countdown"):
        catalog.with_rewards(cfg, countdown)
    filled = catalog.with_rewards(config.resolve({}, ["task=countdown"]), countdown)
    assert [(s.name, s.weight) for s in filled.train.rewards] == [("countdown", 1.0), ("countdown_format", 0.2)]
    warning = catalog.correctness_warning(countdown, ["countdown_format", "length"])
    assert warning and "leaves out 'countdown'" in warning
    assert catalog.correctness_warning(countdown, ["countdown", "length"]) is None


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("data.verifier=countdown", "data.verifier is gone: the task checks the data, trains and judges; "
                                    "write `task: countdown`"),
        ("data.generator.task=arithmetic", "data.generator.task is gone: the generator makes data for the task; "
                                           "write `task: math`"),
        ("train.rewards=[]", "train.rewards: Value error, is empty"),
        ("data.prompt.instruction=Answer please", "must contain {question}"),
    ],
)  # fmt: skip
def test_old_and_bad_task_settings_are_refused_with_what_to_write(override, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        config.resolve({}, [override])


def test_a_user_task_needs_its_file_as_a_dvc_dependency():
    cfg = config.resolve({}, ["task=tests/fixtures/even_task.py:TASK"])  # -S sets task_file with it
    assert cfg.task_file == "tests/fixtures/even_task.py"
    with pytest.raises(ConfigError, match="set task_file: tests/fixtures/even_task.py so that DVC re-runs"):
        config.resolve({"task": "tests/fixtures/even_task.py:TASK"})
    assert config.resolve({"task": "tests/fixtures/even_task.py:TASK", "task_file": "tests"}).task_file == "tests"


def test_user_task_loads_from_a_file_and_is_hashed_by_its_file(tmp_path):
    from pipelines.verifiers.versions import verifier_versions

    task = catalog.load("tests/fixtures/even_task.py:TASK", ROOT)
    assert task.name == "even" and catalog.load("tests/fixtures/even_task.py", ROOT) is task  # TASK by default
    before = verifier_versions(task, ["judge", "even_correct"])
    copy = tmp_path / "even_task.py"
    shutil.copy(EXAMPLE, copy)
    copy.write_text(copy.read_text() + "\n# a comment changes the version: the whole file is the code\n")
    edited = catalog.load(f"{copy}:TASK", tmp_path)
    after = verifier_versions(edited, ["judge", "even_correct"])
    assert all(after[k] != before[k] for k in before)


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("x = (\n", "even_task.py, line 1 failed to load: SyntaxError"),
        ("import nonexistent_module_xyz\n", "line 1 failed to load: ModuleNotFoundError"),
        ("TASK = 3\n", "TASK in"),
        ("X = 1\n", "defines no TASK"),
    ],
)
def test_a_broken_task_file_gets_one_line_naming_the_file(tmp_path, source, says):
    (tmp_path / "even_task.py").write_text(source)
    with pytest.raises(TaskError, match=re.escape(says)) as info:
        catalog.load("even_task.py", tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TaskError, match="not found"):
        catalog.load("missing.py:TASK", tmp_path)
    with pytest.raises(TaskError, match="cannot import module"):
        catalog.load("no_such_pkg.mod:TASK", tmp_path)


def _user_task(tmp_path: Path, body: str) -> object:
    text = EXAMPLE.read_text()
    (tmp_path / "even_task.py").write_text(text + "\n" + body)
    return catalog.load("even_task.py:TASK", tmp_path)


def test_a_golden_disagreement_is_refused_naming_the_case(tmp_path):
    task = _user_task(tmp_path, "import dataclasses\nTASK = dataclasses.replace(TASK, golden=[Golden('#### yes', "
                                "{'answer': 'no'}, correct=True)])\n")  # fmt: skip
    with pytest.raises(
        TaskError, match=r"golden case 0 \('#### yes'\): the judge says correct=False, the case expects"
    ):
        catalog.check_golden(task, timeout=30, knob="data.check_timeout")
    disagreeing = _user_task(
        tmp_path, "import dataclasses\nTASK = dataclasses.replace(TASK, rewards=[Reward('even_correct', "
        "lambda prompts, completions, **_: [1.0] * len(completions))])\n",
    )  # fmt: skip
    with pytest.raises(TaskError, match="the correctness reward 'even_correct' gives 1.0 but the judge says correct"):
        catalog.check_golden(disagreeing, timeout=30, knob="data.check_timeout")


def test_user_reward_and_judge_mistakes_name_the_function_and_the_row(tmp_path):
    task = _user_task(
        tmp_path,
        "def short(prompts, completions, **_):\n    return [1.0]\n"
        "def text(prompts, completions, **_):\n    return ['high'] * len(completions)\n"
        "def picky(prompts, completions, answer, **_):\n    return [1.0 if 'no' in c else 1 / 0 for c in completions]\n"
        "def bad_judge(completion, row):\n    return {'correct': True}\n"
        "import dataclasses\n"
        "TASK = dataclasses.replace(TASK, rewards=[*TASK.rewards, Reward('short', short), Reward('text', text), "
        "Reward('picky', picky)])\n"
        "BAD = dataclasses.replace(TASK, judge=bad_judge)\n",
    )
    rows = [{"id": "even-4", "prompt": "q", "answer": "yes"}]
    with pytest.raises(RewardError, match="reward function 'short' returned 1 values for 2 completions"):
        score([RewardSpec(name="short")], rows, ["#### yes", "no"], 2, timeout=30, task=task)
    with pytest.raises(RewardError, match=r"'text' returned 'high' \(a str\) for completion 0 \(row 'even-4'\)"):
        score([RewardSpec(name="text")], rows, ["#### yes"], 1, timeout=30, task=task)
    two = [*rows, {"id": "even-5", "prompt": "q", "answer": "no"}]
    with pytest.raises(
        RewardError, match=r"'picky' raised ZeroDivisionError: .* \(first on completion 2, row 'even-5'\)"
    ):
        score([RewardSpec(name="picky")], two, ["#### no", "#### no", "#### yes", "no"], 2, timeout=30, task=task)
    bad = catalog.load("even_task.py:BAD", tmp_path)
    with pytest.raises(Exception, match="returned dict for row 'even-4'; it must return .*Verdict"):
        judge_all(["#### yes"], rows, task=bad, timeout=30)


def test_the_docs_show_the_example_task_file_as_it_is():
    page = (ROOT / "docs" / "data-and-tasks.md").read_text()
    block = page.split("### Your own task", 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0]
    assert block == EXAMPLE.read_text().rstrip("\n")
    assert 30 <= len(block.splitlines()) <= 70


def test_the_gate_refuses_when_the_judge_and_the_training_reward_disagree():
    from pipelines.config import EvaluateConfig, RegisterConfig
    from pipelines.registry.gate import Evidence, decide

    base = dict(candidate=[True] * 8, reference=[False] * 8, champion=None, candidate_format_rate=1.0)
    agree = decide(Evidence(**base, judge_disagreements=(0, 16)), RegisterConfig(), EvaluateConfig())
    assert agree.promote and agree.checks["judge_agrees_with_reward"]
    apart = decide(Evidence(**base, judge_disagreements=(3, 16)), RegisterConfig(), EvaluateConfig())
    assert not apart.promote and "disagree on 3 of 16 ledger completions" in apart.reason
    off = RegisterConfig(require_judge_agreement=False)
    assert decide(Evidence(**base, judge_disagreements=(3, 16)), off, EvaluateConfig()).promote
