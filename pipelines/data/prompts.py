"""Turn a question into the chat messages the model sees (system prompt, worked examples, instruction)."""

from __future__ import annotations

from typing import Any

from pipelines.config import PromptConfig
from pipelines.verifiers.task import Task

Message = dict[str, str]


def task_prompt(cfg: PromptConfig, task: Task) -> PromptConfig:
    """data.prompt with what it leaves null taken from the task: the template the rows are built with.

    >>> from pipelines.verifiers.math_task import TASK
    >>> task_prompt(PromptConfig(), TASK).instruction
    '{question} Give the final answer after ####.'
    """
    return PromptConfig(
        system=task.system if cfg.system is None else (cfg.system or None),
        instruction=task.instruction if cfg.instruction is None else cfg.instruction,
        examples=[dict(e) for e in task.examples] if cfg.examples is None else cfg.examples,
    )


def question_of(prompt: Any, row: dict[str, Any] | None, task: Task | None) -> Any:
    """The row's question as the task shows it (e.g. with its options); chat messages as written."""
    if task is None or task.render is None or isinstance(prompt, list):
        return prompt
    return task.render(str(prompt), dict(row or {}))


def build_messages(question: str | list[Message], cfg: PromptConfig) -> list[Message]:
    """Chat messages for one row. A row that already holds messages is kept as written.

    >>> build_messages("What is 1 + 1?", PromptConfig(instruction="{question} Answer after ####.", examples=[]))
    [{'role': 'user', 'content': 'What is 1 + 1? Answer after ####.'}]
    """
    if isinstance(question, list):
        messages = [dict(m) for m in question]
        if cfg.system and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": cfg.system})
        return messages
    messages: list[Message] = []
    if cfg.system:
        messages.append({"role": "system", "content": cfg.system})
    instruction = cfg.instruction or "{question}"
    for example in cfg.examples or []:
        messages.append({"role": "user", "content": _fill(instruction, example["question"])})
        if "call" in example:  # a worked tool call: the call, the tool's reply, then the answer
            messages.append({"role": "assistant", "content": example["call"]})
            messages.append({"role": "tool", "content": example.get("result", "")})
        messages.append({"role": "assistant", "content": example["answer"]})
    messages.append({"role": "user", "content": _fill(instruction, question)})
    return messages


def _fill(template: str, question: str) -> str:
    # str.replace, not str.format: questions may contain braces (LaTeX, code).
    return template.replace("{question}", question)


def prompt_text(prompt: Any) -> str:
    """The text of the last user turn (or the string itself): what length bounds apply to."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return "" if prompt is None else str(prompt)
