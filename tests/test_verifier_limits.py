"""Verifiers on hostile model output take linear time, and a time limit really stops a verifier
(issue "Hardening", item 1): each shape below took seconds to minutes with the old patterns."""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time

import pytest

from pipelines.config import RewardSpec
from pipelines.grpo.reward_runner import RewardError, score
from pipelines.verifiers import rewards
from pipelines.verifiers.judge import judge, judge_all
from pipelines.verifiers.math_answer import (
    answers_match,
    boxed_contents,
    extract_final_answer,
    last_answer_tag,
    last_number,
    parse_number,
    reference_answer,
    strict_answer,
)
from pipelines.verifiers.runner import VerifierError, Worker, shared_worker

MB = 1 << 20
PER_CALL_S = 2.0  # linear code takes milliseconds here; the old patterns took minutes at this size

HOSTILE = {
    "whitespace run": "x " + " " * MB + "y",
    "whitespace tokens": "7" + (" " * 80 + "\n") * (MB // 81) + "x",  # SmolLM2 has 81-character whitespace tokens
    "#### 7 + spaces + junk": "#### 7" + " " * MB + "x",
    "#### + spaces + 7 + spaces + junk": "####" + " " * (MB // 2) + "7" + " " * (MB // 2) + ".x",
    "unclosed boxed, repeated": "\\boxed{" * (MB // 7),
    "unclosed answer tag, repeated": "<answer>" * (MB // 8),
    "answer tags opened, closed at the end": "<answer>" * (MB // 8) + "</answer>",
    "long digit run": "1" * MB,
    "long digit run + junk": "#### " + "1" * MB + " x",
    "digits and commas": "1," * (MB // 2) + ".",
    "many numbers": "1 " * (MB // 2) + "x",
    "signs and dollars": "-$ " * (MB // 3) + "x",
    "fraction bars": "1 / " * (MB // 4) + "x",
    "deeply nested braces": "\\boxed{" + "{" * MB,
    "nested braces, closed": "\\boxed{" + "{" * (MB // 2) + "}" * (MB // 2) + "}",
    "hash marks": "####\n" * (MB // 5),
}

CALLS = {
    "extract_final_answer": extract_final_answer,
    "strict_answer": strict_answer,
    "last_number": last_number,
    "boxed_contents (whole text)": boxed_contents,
    "last_answer_tag (whole text)": last_answer_tag,
    "reference_answer": reference_answer,
    "parse_number": parse_number,
    "answers_match": lambda text: answers_match(text, "7"),
    "judge": lambda text: judge(text, "7"),
    "accuracy_reward": lambda text: rewards.accuracy_reward(["q"], [text], answer=["7"]),
    "format_reward": lambda text: rewards.format_reward(["q"], [text]),
    "countdown_reward": lambda text: rewards.countdown_reward(["q"], [text], numbers=[[3, 4]], answer=["7"]),
}


@pytest.mark.parametrize("shape", sorted(HOSTILE))
def test_verifiers_take_linear_time_on_hostile_text(shape):
    text = HOSTILE[shape]
    slow = {}
    for name, call in CALLS.items():
        started = time.perf_counter()
        call(text)
        elapsed = time.perf_counter() - started
        if elapsed > PER_CALL_S:
            slow[name] = round(elapsed, 2)
    assert not slow, f"{shape} ({len(text):,} chars): {slow}"


def test_answers_at_the_end_of_hostile_text_are_still_read():
    assert strict_answer(" " * MB + "#### 7") == "7"
    assert extract_final_answer("\\boxed{" * 1000 + "\\boxed{7}") == "7"
    assert extract_final_answer("<answer>" * 1000 + "7</answer>") == "<answer>" * 999 + "7"  # as findall read it
    assert last_number("1" * MB + " then 7") == "7"


# ---- The time limit ----


def _loops_forever(prompts, completions, **_):
    """A reward function that never returns (pure Python: a thread could not be stopped)."""
    while True:
        pass


def _holds_the_gil(prompts, completions, **_):
    """A catastrophic regular expression: one C call that holds the GIL for minutes."""
    re.match(r"(a*)*b", "a" * 64)
    return [0.0] * len(completions)


def _ends_the_process(prompts, completions, **_):
    os._exit(3)


ROWS = [{"id": "a", "prompt": "p", "answer": "7"}]


@pytest.mark.parametrize("fn", [_loops_forever, _holds_the_gil])
def test_a_reward_function_that_never_returns_is_stopped_and_named(monkeypatch, fn):
    monkeypatch.setitem(rewards.REWARDS, "stuck", fn)
    started = time.monotonic()
    with pytest.raises(RewardError, match="'stuck' did not finish within 0.5 s") as err:
        score([RewardSpec(name="accuracy"), RewardSpec(name="stuck")], ROWS, ["#### 7"], 1, timeout=0.5)
    assert time.monotonic() - started < 0.5 + 1.0
    assert "train.reward_timeout" in str(err.value) and "fix the function" in str(err.value)
    # The worker was replaced: the next step scores normally.
    per_fn, _ = score([RewardSpec(name="accuracy")], ROWS, ["#### 7"], 1, timeout=5)
    assert per_fn.tolist() == [[1.0]]


def test_the_limit_holds_off_the_main_thread(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "stuck", _holds_the_gil)
    caught: list[BaseException] = []

    def step() -> None:
        try:
            score([RewardSpec(name="stuck")], ROWS, ["x"], 1, timeout=0.3)
        except RewardError as exc:
            caught.append(exc)

    worker = threading.Thread(target=step)
    started = time.monotonic()
    worker.start()
    worker.join(5)
    assert caught and not worker.is_alive() and time.monotonic() - started < 0.3 + 1.0


def test_a_failing_function_keeps_the_worker_and_a_crashing_one_is_named(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "broken", lambda prompts, completions, **_: 1 / 0)
    pids = []
    for _ in range(2):
        with pytest.raises(RewardError, match="'broken' raised ZeroDivisionError") as err:
            score([RewardSpec(name="accuracy"), RewardSpec(name="broken")], ROWS, ["#### 7"], 1, timeout=5)
        pids.append(shared_worker()._process.pid)
    assert pids[0] == pids[1]  # an exception is not a reason to start another worker
    assert "1 / 0" in "".join(err.value.__notes__)  # the worker's traceback comes along
    monkeypatch.setitem(rewards.REWARDS, "crash", _ends_the_process)
    with pytest.raises(RewardError, match=r"'crash' ended the verifier worker process \(exit code 3\)"):
        score([RewardSpec(name="crash")], ROWS, ["x"], 1, timeout=5)
    assert score([RewardSpec(name="accuracy")], ROWS, ["#### 7"], 1, timeout=5)[0].tolist() == [[1.0]]


def _scaled(prompts, completions, answer, scale=1.0, **_):
    return [scale if a == "7" else -1.0 for a in answer]


def test_reward_params_are_keywords_that_columns_override(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "scaled", _scaled)
    spec = RewardSpec(name="scaled", params={"scale": 0.5, "answer": ["not the column"]})
    per_fn, _ = score([spec], ROWS, ["x"], 1, timeout=5)
    assert per_fn.tolist() == [[0.5]]  # as functools.partial: the call's columns win over bound params


def test_judging_runs_under_its_own_limit(monkeypatch):
    from pipelines.verifiers.math_task import TASK

    rows = [{"answer": "7"}] * 2
    assert [v["correct"] for v in judge_all(["#### 7", "#### 8"], rows, task=TASK, timeout=5)] == [True, False]
    stuck = dataclasses.replace(TASK, judge=lambda completion, row: _loops_forever([], []))
    started = time.monotonic()
    with pytest.raises(
        VerifierError, match=r"'judge of task math' did not finish within 0.5 s.*evaluate.judge_timeout"
    ):
        judge_all(["x"], rows[:1], task=stuck, timeout=0.5)
    assert time.monotonic() - started < 0.5 + 1.0


def test_spawned_worker_runs_importable_functions_and_falls_back_for_the_rest():
    """Where fork is not used (macOS, Windows), built-ins go to a spawned worker; a lambda cannot
    be sent there, so it runs under a thread in the caller, with the same limit and errors."""
    worker = Worker(start_method="spawn")
    try:
        jobs = [("accuracy", rewards.accuracy_reward, {})]
        assert worker.run(jobs, (["q"], ["#### 7"]), {"answer": ["7"]}, timeout=60, what="reward function",
                          knob="train.reward_timeout") == [[1.0]]  # fmt: skip
        assert worker._process is not None and worker._process.is_alive()
        lam = [("lam", lambda prompts, completions, **_: [2.0] * len(completions), {})]
        assert worker.run(lam, (["q"], ["x"]), {}, timeout=5, what="reward function", knob="k") == [[2.0]]
        slow = [("slow", lambda prompts, completions, **_: time.sleep(3), {})]
        with pytest.raises(VerifierError, match="'slow' did not finish within 0.2 s.*define it at module level"):
            worker.run(slow, (["q"], ["x"]), {}, timeout=0.2, what="reward function", knob="k")
    finally:
        worker.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_the_forked_worker_keeps_none_of_the_parents_files_or_sockets(tmp_path):
    import socket

    with socket.socket() as server, (tmp_path / "held").open("w") as held:
        server.bind(("127.0.0.1", 0))
        server.listen()
        worker = Worker()
        try:
            worker.run([("accuracy", rewards.accuracy_reward, {})], (["q"], ["#### 7"]), {"answer": ["7"]}, timeout=30,
                       what="reward function", knob="k")  # fmt: skip
            if worker.start_method != "fork":
                pytest.skip("only a forked worker inherits descriptors")
            open_in_worker = {int(fd) for fd in os.listdir(f"/proc/{worker._process.pid}/fd")}
        finally:
            worker.close()
        assert server.fileno() not in open_in_worker and held.fileno() not in open_in_worker


_ORPHAN = """
import os, re, threading
from pipelines.verifiers.runner import Worker

def hog(prompts, completions, **_):
    re.match(r"(a*)*b", "a" * 64)

worker = Worker()
def die():
    print(worker._process.pid, flush=True)
    os.kill(os.getpid(), 9)
threading.Timer(0.5, die).start()
worker.run([("hog", hog, {})], (["q"], ["x"]), {}, timeout=1.0, what="reward function", knob="k")
"""


@pytest.mark.slow
def test_a_worker_stuck_in_c_code_ends_itself_when_its_parent_was_killed():
    """The parent is killed with SIGKILL while the worker holds the GIL in a regular expression: the
    worker's own alarm ends it at the limit plus BACKSTOP_S, so no orphan spins on or holds a pipe."""
    import subprocess
    import sys

    from pipelines.verifiers.runner import BACKSTOP_S

    proc = subprocess.run([sys.executable, "-c", _ORPHAN], capture_output=True, text=True, timeout=60)
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 1.0 + BACKSTOP_S + 2.0
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(") ")[1].startswith("Z"):
                    break  # ended (a zombie waits for its new parent to reap it)
        except FileNotFoundError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"worker {pid} still runs {1.0 + BACKSTOP_S + 2.0:g} s after its limit began, its parent killed")
