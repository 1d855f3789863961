"""Per-row facts the GX suite checks: types, texts, lengths, the verifier's reading of the answer.

The Table keeps values as the file held them; this module turns them into the flat columns of a
DataFrame (one pass, plain Python), so the expectations stay simple column checks.
"""

from __future__ import annotations

import math
import unicodedata
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pandas as pd

from pipelines.config import DataConfig
from pipelines.data.prompts import build_messages, prompt_text, question_of, task_prompt
from pipelines.data.table import Table
from pipelines.verifiers.math_answer import reference_answer
from pipelines.verifiers.task import Task

ROLES = {"system", "user", "assistant"}
ID_TYPES = ["str", "int"]
ANSWER_TYPES = ["str", "int", "float"]


def text_of(value: Any) -> str | None:
    """Stripped text of a value; None for missing, NaN and empty values (a value of the wrong type
    still has a text, so only the type expectation fires for it, not the not-null one too)."""
    if value is None:
        return None
    if isinstance(value, float) and not isinstance(value, bool):
        if not math.isfinite(value):
            return None
        if value.is_integer():
            return str(int(value))
    text = str(value).strip()
    return text or None


def type_of(value: Any) -> str | None:
    """`str`, `int`, `float`, ... for a present value; None when it is missing (so only the
    not-null expectation fires, not the type one too)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return "int"  # Parquet and pandas store integer ids as floats next to missing values
    return type(value).__name__


def prompt_kind(prompt: Any) -> str | None:
    """`text`, `messages` (a list of {role, content} with a user turn), or what it is instead."""
    if isinstance(prompt, str):
        return "text"
    if isinstance(prompt, list):
        ok = bool(prompt) and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in prompt
        )
        return (
            "messages"
            if ok and any(m["role"] == "user" for m in prompt)
            else "list without a user turn as {role, content}"
        )
    return type_of(prompt)


def prompt_key(prompt: Any) -> str:
    """The prompt as leakage is judged: the user turns with case, all spacing and final
    punctuation ignored (cheap enough for a million rows: C-level string methods only).

    >>> prompt_key("What is 1+2 ?") == prompt_key([{"role": "user", "content": "what is 1 + 2"}])
    True
    """
    if isinstance(prompt, list):
        text = "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict) and m.get("role") == "user")
    else:
        text = "" if prompt is None else str(prompt)
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return "".join(text.casefold().split()).rstrip(".?!:;")


def final_answer(answer: str) -> str:
    """verifiers' reference_answer, with a fast path for the common bare answer (no marker)."""
    if "#" not in answer and "boxed" not in answer and "<" not in answer:
        return answer.strip()
    return reference_answer(answer)


def task_answer(answer: str, task: Task) -> str:
    """The row's answer as the task's reference (math: GSM8K's `... #### N` -> N); stripped text by default."""
    if task.answer_of is reference_answer:
        return final_answer(answer)  # the same, faster on a million bare answers
    return task.answer_of(answer) if task.answer_of is not None else answer.strip()


def task_rows(
    table: Table, answers: list[str | None], task: Task, batch: int = 4096
) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:
    """(indices, rows) in batches, of the rows the task's own check reads: a readable answer and every
    column the task needs (the others get their reason from `missing_columns` or the answer
    expectations). Built a batch at a time: a million rows never exist twice as dicts."""
    needed = [c for c in task.columns if c != "answer"]
    keep: list[int] = []
    rows: list[dict[str, Any]] = []
    for i, (extras, answer) in enumerate(zip(table.extras, answers, strict=True)):
        extras = extras or {}
        if answer is None or any(extras.get(c) is None for c in needed):
            continue
        keep.append(i)
        rows.append({**extras, "id": table.id[i], "answer": answer})
        if len(rows) == batch:
            yield keep, rows
            keep, rows = [], []
    if rows:
        yield keep, rows


def missing_columns(table: Table, answers: list[str | None], task: Task) -> list[str | None]:
    """Per row: which of the task's columns it lacks (None when it has them all or has no readable answer)."""
    needed = [c for c in task.columns if c != "answer"]
    out: list[str | None] = []
    for extras, answer in zip(table.extras, answers, strict=True):
        lacking = [c for c in needed if (extras or {}).get(c) is None]
        out.append(
            f"the {task.name} task needs column(s) {', '.join(lacking)}" if lacking and answer is not None else None
        )
    return out


def row_frame(table: Table, cfg: DataConfig, task: Task, tokens: list[int] | None) -> pd.DataFrame:
    """One row per dataset row: `_row` (its index in the Table) and the columns the suite checks."""
    n = len(table)
    kinds = [prompt_kind(p) for p in table.prompt]
    good_prompt = [k in ("text", "messages") for k in kinds]
    texts = [text_of(prompt_text(p) if ok else p) for p, ok in zip(table.prompt, good_prompt, strict=True)]
    answer_types = [type_of(a) for a in table.answer]
    answers = [text_of(a) for a in table.answer]
    # The verifier reads only answers of a usable type; the type expectation reports the others.
    readable = [a if t in ANSWER_TYPES else None for a, t in zip(answers, answer_types, strict=True)]
    columns: dict[str, Any] = {
        "_row": range(n),
        "id": [text_of(v) for v in table.id],
        "id_type": [type_of(v) for v in table.id],
        "prompt_kind": kinds,
        "prompt_text": texts,
        "answer": answers,
        "answer_type": answer_types,
        "answer_final": [task_answer(a, task) if a is not None else None for a in readable],
    }
    if tokens is not None:
        columns["prompt_tokens"] = tokens
    else:
        columns["prompt_chars"] = [
            len(t) if t is not None and ok else None for t, ok in zip(texts, good_prompt, strict=True)
        ]
    columns["task_issue"] = missing_columns(table, readable, task)  # the task's own check fills in the rest
    frame = pd.DataFrame(columns)
    for name in ("prompt_chars", "prompt_tokens"):
        if name in frame:
            frame[name] = frame[name].astype("Int64")  # integers with missing values, not floats
    return frame


def token_counts(table: Table, cfg: DataConfig, tokenizer_dir: Path, task: Task) -> list[int | None]:
    """Tokens of each row's prompt as the model sees it: the chat template applied to the system
    prompt, worked examples and question (or the plain text when there is no template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    counts: list[int | None] = []
    batch: list[str] = []
    slots: list[int] = []

    def flush() -> None:
        for slot, ids in zip(slots, tokenizer(batch, add_special_tokens=False)["input_ids"], strict=True):
            counts[slot] = len(ids)
        batch.clear()
        slots.clear()

    template = task_prompt(cfg.prompt, task)
    for prompt, extras in zip(table.prompt, table.extras, strict=True):
        counts.append(None)
        if prompt_kind(prompt) not in ("text", "messages"):
            continue
        messages = build_messages(question_of(prompt, extras, task), template)
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            rendered = "\n".join(m["content"] for m in messages)
        batch.append(rendered)
        slots.append(len(counts) - 1)
        if len(batch) >= 512:
            flush()
    if batch:
        flush()
    return counts
