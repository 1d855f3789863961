"""Tools a task gives the model: typed Python functions it may call between turns.

- A tool is a plain function with type hints and a Google-style docstring (`Args:`), the contract
  of transformers' `get_json_schema`, which describes it to the model: through the chat template's
  own tool format where the tokenizer's template has one (`apply_chat_template(tools=...)`), else
  in the system prompt with the tagged format Qwen and Hermes models use:
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
- Model text is parsed, never evaluated: the call is JSON inside the tags, bounded in length, its
  arguments checked against the function's signature (names, types, lengths) before it runs.
- A tool runs where verifiers run: in the verifier worker process, under the task's time limit
  (runner.py). A tool that raises, hangs or gets bad arguments gives the model an `error: ...`
  message as its result, never a crash of the run.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MAX_CALL_CHARS = 2_000  # the JSON inside one <tool_call> tag
MAX_ARGUMENT_CHARS = 500  # one string argument
MAX_RESULT_CHARS = 500  # what goes back to the model
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_TYPES: dict[Any, tuple[type, ...]] = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolResult:
    """What one call gave: the text the model reads next, and whether it is an error."""

    call: dict[str, Any] | None  # {"name", "arguments"} as parsed, None when the text was no call
    text: str
    error: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"call": self.call, "result": self.text, "error": self.error, "seconds": round(self.seconds, 4)}


def schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of a tool, as chat templates take it (transformers' get_json_schema)."""
    from transformers.utils import get_json_schema

    return get_json_schema(fn)


def check_tool(fn: Any) -> str | None:
    """Why `fn` cannot be a tool (None when it can): a function the schema reader accepts, whose
    parameters are all str, int, float or bool."""
    if not callable(fn) or not getattr(fn, "__name__", ""):
        return f"{fn!r} is not a named function"
    try:
        schema(fn)
    except Exception as exc:  # transformers' reason: a missing hint or docstring `Args:` entry
        return f"tool {fn.__name__}: {exc}"
    for name, hint in _hints(fn).items():
        if hint not in _TYPES:
            return f"tool {fn.__name__}: parameter {name!r} is {hint!r}; a tool takes str, int, float or bool"
    return None


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    hints = typing.get_type_hints(fn)
    return {name: hints.get(name) for name in inspect.signature(fn).parameters}


def native_format(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template has a tool format of its own (it reads `tools`)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in (template if isinstance(template, str) else " ".join(map(str, template.values())))


def describe(tools: Sequence[Callable[..., Any]]) -> str:
    """The tools in the tagged format, for a system prompt (templates without a tool format).

    >>> def add(a: int, b: int) -> int:
    ...     '''Add two integers.
    ...
    ...     Args:
    ...         a: the first
    ...         b: the second
    ...     '''
    ...     return a + b
    >>> print(describe([add]).splitlines()[0])
    You can call these tools. To call one, write <tool_call>{"name": NAME, "arguments": {...}}</tool_call>
    """
    lines = [
        'You can call these tools. To call one, write <tool_call>{"name": NAME, "arguments": {...}}</tool_call>',
        "and stop; the result comes back as a message from `tool`. Tools:",
    ]
    # (without the return type: the embedded model copied it into its calls as if it were an argument)
    lines += [json.dumps({k: v for k, v in schema(fn)["function"].items() if k != "return"}) for fn in tools]
    return "\n".join(lines)


def parse_call(text: str) -> tuple[ToolCall | None, str | None]:
    """(the first tool call in a model turn, None) or (None, why it is not a valid call), or
    (None, None) when the turn calls no tool.

    >>> parse_call('<tool_call>{"name": "calc", "arguments": {"x": "1+1"}}</tool_call>')
    (ToolCall(name='calc', arguments={'x': '1+1'}), None)
    >>> parse_call("#### 4")
    (None, None)
    >>> parse_call("<tool_call>calc(1+1)</tool_call>")[1]
    'the tool call is not JSON: write <tool_call>{"name": NAME, "arguments": {...}}</tool_call>'
    """
    match = _CALL.search(text)
    if match is None:
        return None, None
    body = match.group(1).strip()
    if len(body) > MAX_CALL_CHARS:
        return None, f"the tool call is longer than {MAX_CALL_CHARS} characters"
    try:
        data = json.loads(body)
    except ValueError:
        return None, 'the tool call is not JSON: write <tool_call>{"name": NAME, "arguments": {...}}</tool_call>'
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None, 'the tool call needs a "name"'
    arguments = data.get("arguments", {})
    if not isinstance(arguments, dict):
        return None, '"arguments" must be an object of named values'
    return ToolCall(data["name"], arguments), None


def check_arguments(fn: Callable[..., Any], arguments: dict[str, Any]) -> str | None:
    """Why `arguments` do not fit `fn`'s signature (None when they do): names, types, lengths.

    >>> def f(x: str, n: int = 1) -> str: return x
    >>> check_arguments(f, {"x": "a"}), check_arguments(f, {"x": 1}), check_arguments(f, {"y": "a"})
    (None, 'argument x must be str, not int', 'unknown argument y; f takes x, n')
    """
    hints = _hints(fn)
    params = inspect.signature(fn).parameters
    for name, value in arguments.items():
        if name not in hints:
            return f"unknown argument {name}; {fn.__name__} takes {', '.join(hints)}"
        allowed = _TYPES.get(hints[name], ())
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            return f"argument {name} must be {hints[name].__name__}, not {type(value).__name__}"
        if isinstance(value, str) and len(value) > MAX_ARGUMENT_CHARS:
            return f"argument {name} is longer than {MAX_ARGUMENT_CHARS} characters"
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in arguments]
    return f"missing argument {', '.join(missing)}" if missing else None


def call_tool(tools: Sequence[Callable[..., Any]], text: str, timeout: float) -> ToolResult | None:
    """Run the tool call in a model turn, or None when the turn calls no tool. Every failure (a call
    that is not JSON, an unknown tool, bad arguments, a tool that raises or overruns `timeout`)
    becomes an error result for the model to read."""
    from pipelines.verifiers.runner import VerifierError, run_limited

    started = time.perf_counter()
    call, problem = parse_call(text)
    if call is None and problem is None:
        return None
    parsed = None if call is None else {"name": call.name, "arguments": call.arguments}
    by_name = {fn.__name__: fn for fn in tools}
    if call is not None and call.name not in by_name:
        problem = f"there is no tool {call.name!r}; the tools are {', '.join(by_name)}"
    elif call is not None:
        problem = check_arguments(by_name[call.name], call.arguments)
    if problem is not None:
        return ToolResult(parsed, f"error: {problem}", True, time.perf_counter() - started)
    try:
        (value,) = run_limited(
            [(call.name, by_name[call.name], call.arguments)], (), {}, timeout=timeout, what="tool", knob="tool_timeout"
        )
    except VerifierError as exc:
        reason = str(exc).split(": fix the function")[0]  # what happened, without the advice for the task's author
        return ToolResult(parsed, f"error: {reason}"[:MAX_RESULT_CHARS], True, time.perf_counter() - started)
    return ToolResult(parsed, str(value)[:MAX_RESULT_CHARS], False, time.perf_counter() - started)
