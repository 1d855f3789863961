"""Tools and multi-turn episodes: tools parsed and run safely, episodes laid out so that only the
model's own tokens are trained, recorded turn by turn, trained and resumed exactly."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import torch
from transformers import AutoTokenizer

from pipelines import config
from pipelines.data import validate
from pipelines.generation import backends
from pipelines.generation.multi_turn import Environment, ToolTurn, transcript
from pipelines.generation.rollout import generate
from pipelines.grpo import ledger, trainer
from pipelines.grpo.logprobs import token_logps
from pipelines.grpo.loss import grpo_loss
from pipelines.paths import Paths
from pipelines.verifiers import calculator_task, tools
from pipelines.verifiers.calculator_task import calculator
from pipelines.verifiers.task import Task, TaskError
from tests.conftest import free_port, make_project

TASK = calculator_task.TASK
QUESTION = re.compile(r"What is (\d+) \* (\d+)\?")


class Scripted:
    """A rollout backend that plays the calculator task: every episode's first turn calls the tool on its
    question; the turn after the tool's reply answers, right or wrong by its seed (so groups differ)."""

    def __init__(self, logps: bool = False) -> None:
        self.requests: list[backends.SamplingRequest] = []
        self.logps = logps

    def completions(self, model, tokenizer, input_ids, attention_mask, request):
        self.requests.append(request)
        texts = []
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
            context = tokenizer.decode(ids[mask.bool()])
            last_user = context.rsplit("<|im_start|>user", 1)[-1]
            a, b = (int(x) for x in QUESTION.findall(last_user)[-1])
            for j in range(request.num_generations):
                if "<|im_start|>tool" not in last_user:
                    texts.append(calculator_task.CALL % f"{a} * {b}")
                else:
                    seed = request.seeds[row] if request.seeds else j
                    answer = a * b if seed % 2 == 0 else a * b + 1
                    texts.append(f"{a} * {b} = {answer}\n#### {answer}")
        encoded = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e)
        # Log-probs only when asked: a made-up sampler's would make training's importance correction mask all.
        return backends.Sampled(ids, torch.full(ids.shape, -0.5) if self.logps and request.do_sample else None)


@pytest.fixture
def tokenizer(tiny_reference):
    tok = AutoTokenizer.from_pretrained(tiny_reference)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def _prompts(*pairs):
    from pipelines.config import PromptConfig
    from pipelines.data.prompts import build_messages, task_prompt

    template = task_prompt(PromptConfig(), TASK)
    return [build_messages(f"What is {a} * {b}?", template) for a, b in pairs]


# -- tools ------------------------------------------------------------------------------------------


def test_the_calculator_parses_its_input_and_never_evaluates_it():
    assert calculator("23 * 47") == "1081" and calculator("(2 + 3) * 4") == "20"
    assert calculator("7 / 2") == "7/2 (= 3.5)"
    for hostile in ("__import__('os').system('true')", "2 ** 1000", "1; 2", "open('x')"):
        assert calculator(hostile).startswith("error: "), hostile


def test_a_call_is_parsed_and_its_arguments_checked():
    call, problem = tools.parse_call(
        'ok <tool_call> {"name": "calculator", "arguments": {"expression": "1+2"}} </tool_call>'
    )
    assert problem is None and call == tools.ToolCall("calculator", {"expression": "1+2"})
    assert tools.parse_call("no call here") == (None, None)
    assert "not JSON" in tools.parse_call("<tool_call>calculator(1+2)</tool_call>")[1]
    assert "longer than" in tools.parse_call("<tool_call>" + "x" * 5000 + "</tool_call>")[1]
    assert tools.check_arguments(calculator, {"expression": 3}) == "argument expression must be str, not int"
    assert "missing argument expression" in tools.check_arguments(calculator, {})
    assert "longer than" in tools.check_arguments(calculator, {"expression": "1" * 1000})


def boom(expression: str) -> str:
    """Fail on purpose.

    Args:
        expression: anything
    """
    raise ValueError(f"cannot do {expression}")


def stuck(expression: str) -> str:
    """Never answer.

    Args:
        expression: anything
    """
    time.sleep(60)
    return "late"


def _call(name: str, expression: str = "1") -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {{"expression": "{expression}"}}}}</tool_call>'


def test_a_raising_tool_is_reported_to_the_model_not_raised():
    result = tools.call_tool([boom], _call("boom", "2+2"), timeout=5)
    assert result.error and result.text == "error: tool 'boom' raised ValueError: cannot do 2+2"
    unknown = tools.call_tool([boom], _call("nope"), timeout=5)
    assert unknown.error and "there is no tool 'nope'" in unknown.text


def test_a_hanging_tool_is_stopped_and_the_next_call_works():
    started = time.perf_counter()
    result = tools.call_tool([stuck, calculator], _call("stuck"), timeout=0.5)
    assert time.perf_counter() - started < 10
    assert result.error and "did not finish within 0.5 s and was stopped" in result.text
    after = tools.call_tool([stuck, calculator], _call("calculator", "6 * 7"), timeout=5)
    assert not after.error and after.text == "42"


def test_a_task_refuses_tools_it_cannot_describe_or_turns_that_cannot_answer():
    from pipelines.verifiers.catalog import check_tools

    def undocumented(x: str) -> str:
        return x

    parts = {"name": "t", "judge": TASK.judge, "rewards": TASK.rewards, "correctness": "accuracy"}
    with pytest.raises(TaskError, match="tool undocumented"):
        check_tools(Task(**parts, tools=(undocumented,), max_turns=2))
    with pytest.raises(TaskError, match="max_turns"):
        Task(**parts, tools=(calculator,), max_turns=1)


def test_the_tools_are_described_in_the_prompt_and_their_code_is_versioned(tokenizer):
    from pipelines.generation.rollout import render_prompts
    from pipelines.verifiers.versions import verifier_versions

    (rendered,) = render_prompts(tokenizer, _prompts((12, 34)), TASK.tools)
    assert '"name": "calculator"' in rendered and "<tool_call>" in rendered
    assert rendered.count("<|im_start|>tool") == 2  # the two worked calls' replies
    versions = verifier_versions(TASK, ["accuracy", "judge"])
    assert len(versions["tools"]) == 64
    assert "tools" not in verifier_versions(calculator_task.math_task.TASK, ["accuracy"])


# -- episodes ---------------------------------------------------------------------------------------


def test_a_tool_reply_sits_between_turns_as_the_chat_template_renders_it(tokenizer):
    between = ToolTurn(tokenizer)
    assert (between.prefix, between.suffix) == ("\n<|im_start|>tool\n", "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture
def scripted(monkeypatch):
    backend = Scripted()
    monkeypatch.setitem(backends.BACKENDS, "lean", backend)
    return backend


def test_an_episode_calls_the_tool_reads_its_reply_and_answers(tokenizer, scripted):
    scripted.logps = True
    rollout = generate(
        None, tokenizer, _prompts((12, 34), (56, 78)), num_generations=2, max_new_tokens=96, do_sample=True,
        seeds=[4, 5], environment=Environment.of(TASK),
    )  # fmt: skip
    assert [r.num_generations for r in scripted.requests] == [2, 1]  # a group's first turn, then each episode's
    assert len(rollout.episodes) == 4 and all(len(e) == 2 for e in rollout.episodes)
    first, answer = rollout.episodes[0]
    assert first["call"] == {"name": "calculator", "arguments": {"expression": "12 * 34"}}
    assert (first["result"], first["error"]) == ("408", False) and "result" not in answer
    assert rollout.texts[0] == answer["text"] and rollout.texts[0].endswith("#### " + answer["text"].split()[-1])
    assert "[tool] 408" in rollout.transcripts[0] == transcript(rollout.episodes[0])
    # The reply and the template around it are attended but never trained; the model's tokens are.
    for row in range(4):
        attended = rollout.completion_ids[row][rollout.completion_mask[row].bool()]
        untrained = attended[~rollout.loss_mask[row][: len(attended)].bool()]
        reply = "408" if row < 2 else "4368"
        assert tokenizer.decode(untrained) == f"\n<|im_start|>tool\n{reply}<|im_end|>\n<|im_start|>assistant\n"
        trained = rollout.loss_mask[row].bool()
        assert bool((rollout.sampler_logps[row][trained] == -0.5).all())
        assert bool((rollout.sampler_logps[row][~trained] == 0).all())
    scripted.logps = False  # a backend that reports none: no zeros that would read as certainty
    again = generate(
        None, tokenizer, _prompts((12, 34)), num_generations=2, max_new_tokens=96, do_sample=True, seeds=[4],
        environment=Environment.of(TASK),
    )  # fmt: skip
    assert again.sampler_logps is None


def test_the_loss_gradient_is_zero_on_tool_reply_tokens(tokenizer, scripted, tiny_reference):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_reference)
    rollout = generate(
        model, tokenizer, _prompts((12, 34)), num_generations=2, max_new_tokens=96, do_sample=True, seeds=[0],
        environment=Environment.of(TASK),
    )  # fmt: skip
    logp, entropy = token_logps(model, rollout, with_entropy=True)
    logp.retain_grad()
    mask = rollout.trained_mask.float()
    loss, _ = grpo_loss(
        logp, logp.detach() + 0.1, torch.tensor([1.0, -1.0]), mask, ref_logp=logp.detach() - 0.2, beta=0.1,
        entropy=entropy, entropy_coef=0.01, loss_type="dapo",
    )  # fmt: skip
    loss.backward()
    reply = (rollout.completion_mask == 1) & (rollout.loss_mask == 0)
    assert reply.any() and bool((logp.grad[reply] == 0).all())
    assert bool((logp.grad[rollout.loss_mask.bool()] != 0).all())


def test_the_ledger_holds_every_turn(tokenizer, scripted):
    rollout = generate(
        None, tokenizer, _prompts((12, 34)), num_generations=2, max_new_tokens=96, do_sample=True, seeds=[0],
        environment=Environment.of(TASK),
    )  # fmt: skip
    rows = [{"id": "mul-12-34", "prompt": "What is 12 * 34?"}]
    table = ledger.table(1, rows, rollout, torch.zeros(2, 1), ["accuracy"], torch.zeros(2), torch.zeros(2))
    turns = [json.loads(t) for t in table.column("turns").to_pylist()]
    assert turns == [json.loads(json.dumps(e, sort_keys=True)) for e in rollout.episodes]
    assert turns[0][0]["result"] == "408" and table.column("text").to_pylist() == rollout.texts


def test_a_turn_that_runs_out_of_room_ends_the_episode_truncated(tokenizer, scripted):
    rollout = generate(
        None, tokenizer, _prompts((12, 34)), num_generations=1, max_new_tokens=10, do_sample=False,
        environment=Environment.of(TASK),
    )  # fmt: skip
    assert rollout.truncated.tolist() == [True] and len(rollout.episodes[0]) == 1
    assert rollout.lengths.tolist() == [10]


# -- training ---------------------------------------------------------------------------------------

TOOLS = [
    "task=calculator",
    "data.generator.operators=['*']",
    "data.generator.a_min=10",
    "data.generator.a_max=99",
    "data.generator.b_min=10",
    "data.generator.b_max=99",
    "train.max_completion_length=96",
    "train.checkpoint_every=1",
    "train.learning_rate=0.01",
    "train.eval_every=0",
    "evaluate.max_new_tokens=96",
]


def _project(root, tiny_reference, overrides):
    make_project(root)
    cfg = config.load(root / "params.yaml", [*TOOLS, *overrides], preset="smoke")
    validate.run(cfg, Paths(root))
    shutil.copytree(tiny_reference, Paths(root).reference_dir)
    return cfg


def test_training_on_episodes_logs_turns_and_resumes_exactly(tmp_path, tiny_reference, scripted, monkeypatch):
    from safetensors.torch import load_file

    from pipelines.grpo import run_logger

    whole = tmp_path / "whole"
    cfg = _project(whole, tiny_reference, ["train.steps=3"])
    trainer.run(cfg, Paths(whole), log_to_mlflow=False)
    metrics = json.loads(Paths(whole).train_summary.read_text())
    assert metrics["tools/calls_per_episode"] == 1.0 and metrics["tools/turns_per_episode"] == 2.0
    assert metrics["tools/errors_per_episode"] == 0.0 and metrics["reward_std"] > 0
    turns = ledger.read(ledger.ledger_dir(whole))["turns"].map(json.loads)
    assert len(turns) == 3 * 2 * 4 and all(t[0]["call"]["name"] == "calculator" for t in turns)

    cut = tmp_path / "cut"
    cfg = _project(cut, tiny_reference, ["train.steps=3"])
    original = run_logger.RunLogger.step

    def crash_at_three(self, step, *args, **kwargs):
        if step == 3:
            raise KeyboardInterrupt  # after step 2's checkpoint
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(run_logger.RunLogger, "step", crash_at_three)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(cfg, Paths(cut), log_to_mlflow=False)
    monkeypatch.setattr(run_logger.RunLogger, "step", original)
    assert trainer.run(cfg, Paths(cut), log_to_mlflow=False).resumed_from == 2
    a, b = (load_file(str(Paths(r).policy_dir / "adapter_model.safetensors")) for r in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _episode_rank(rank: int, root: str, port: int) -> None:
    """One of two processes, as torchrun would start it, sampling through the scripted backend."""
    import os
    from pathlib import Path

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backends.BACKENDS["lean"] = Scripted()
    cfg = config.load(Path(root) / "params.yaml", [*TOOLS, "train.steps=2", "train.num_processes=2"], preset="smoke")
    trainer.run(cfg, Paths(Path(root)), log_to_mlflow=False)


def test_two_processes_train_on_episodes_what_one_process_trains(tmp_path, tiny_reference, scripted):

    import pandas as pd
    import torch.multiprocessing as mp
    from test_distributed import _assert_same_adapter

    single = tmp_path / "single"
    trainer.run(_project(single, tiny_reference, ["train.steps=2"]), Paths(single), log_to_mlflow=False)
    ddp = tmp_path / "ddp"
    _project(ddp, tiny_reference, ["train.steps=2"])
    port = free_port()
    mp.spawn(_episode_rank, args=(str(ddp), port), nprocs=2, join=True)

    columns = ["step", "prompt_id", "group", "completion", "completion_ids", "text", "reward", "turns"]
    one, two = (ledger.read(ledger.ledger_dir(root))[columns] for root in (single, ddp))
    assert len(one) == 2 * 2 * 4 and one["turns"].notna().all()
    for frame in (one, two):  # (how long each tool call took is the one thing that differs)
        frame["turns"] = frame["turns"].str.replace(r'"seconds": [0-9.e-]+', "", regex=True)
    pd.testing.assert_frame_equal(two, one)
    _assert_same_adapter(ddp, single)


def test_dynamic_sampling_keeps_each_episode_with_its_masks_and_turns(tokenizer, scripted):
    from pipelines.generation.rollout import concat

    def episodes(*pairs):
        return generate(
            None, tokenizer, _prompts(*pairs), num_generations=2, max_new_tokens=96, do_sample=True,
            seeds=list(range(len(pairs))), environment=Environment.of(TASK),
        )  # fmt: skip

    first, second = episodes((12, 34)), episodes((56, 78), (90, 12))
    kept = concat(
        [first.select(torch.tensor([True, True])), second.select(torch.tensor([False, False, True, True]))], 0
    )
    assert kept.rows == 4 and [e[0]["result"] for e in kept.episodes] == ["408", "408", "1080", "1080"]
    for row, source in ((0, first), (2, second)):
        part = source.loss_mask[0 if source is first else 2]
        assert torch.equal(kept.loss_mask[row][: part.numel()], part)
        assert not kept.loss_mask[row][part.numel() :].any()
