"""Turn a question into the chat messages the model sees (system prompt, worked examples, instruction)."""

from __future__ import annotations

from typing import Any

from pipelines.config import PromptConfig

Message = dict[str, str]


def build_messages(question: str | list[Message], cfg: PromptConfig) -> list[Message]:
    """Chat messages for one row. A row that already holds messages is kept as written.

    >>> build_messages("What is 1 + 1?", PromptConfig(examples=[]))
    [{'role': 'user', 'content': 'What is 1 + 1? Give the final answer after ####.'}]
    """
    if isinstance(question, list):
        messages = [dict(m) for m in question]
        if cfg.system and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": cfg.system})
        return messages
    messages: list[Message] = []
    if cfg.system:
        messages.append({"role": "system", "content": cfg.system})
    for example in cfg.examples:
        messages.append({"role": "user", "content": _fill(cfg.instruction, example["question"])})
        messages.append({"role": "assistant", "content": example["answer"]})
    messages.append({"role": "user", "content": _fill(cfg.instruction, question)})
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
