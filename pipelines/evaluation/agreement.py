"""Does the judge agree with what training rewarded? The last ledger step's completions, re-judged.

Training scored every completion with the task's correctness reward (the ledger keeps it as
`reward_<name>`); evaluation judges with the task's judge. Re-judging the completions of the last
step the ledger holds and counting where the two differ (reward 1.0 exactly when the judge says
correct) catches a reward and a judge that drifted apart, which golden cases alone cannot prove on
the model's real output. The share is reported in reports/eval.md and logged to MLflow by register.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipelines.grpo import ledger
from pipelines.io import read_jsonl
from pipelines.verifiers.judge import judge_all
from pipelines.verifiers.task import Task

EXAMPLES = 3  # disagreeing completions kept in the report


def ledger_agreement(root: Path, train_split: Path, task: Task, *, timeout: float) -> dict[str, Any] | None:
    """{step, checked, disagreements, share, examples} for the ledger's last step; None without a ledger."""
    parts = ledger.parts(ledger.ledger_dir(root))
    if not parts or not train_split.exists():
        return None
    step = max(parts)
    frame = pq.read_table(parts[step]).to_pandas()
    column = f"reward_{task.correctness}"
    result: dict[str, Any] = {"step": step, "reward": task.correctness, "checked": 0, "disagreements": 0}
    if column not in frame:
        result["note"] = f"training did not use {task.correctness!r}, the {task.name} task's correctness reward"
        return result
    rows = {str(r["id"]): r for r in read_jsonl(train_split)}
    picked = [
        (text, rows[str(pid)], float(reward))
        for pid, text, reward in zip(frame["prompt_id"], frame["text"], frame[column], strict=True)
        if str(pid) in rows and reward is not None and not math.isnan(reward)
    ]
    if not picked:
        return result
    verdicts = judge_all([p[0] for p in picked], [p[1] for p in picked], task=task, timeout=timeout)
    wrong = [
        {"id": row["id"], "completion": text[-300:], "reward": reward, "judge_correct": verdict["correct"]}
        for (text, row, reward), verdict in zip(picked, verdicts, strict=True)
        if (reward == 1.0) != bool(verdict["correct"])
    ]
    result.update(
        checked=len(picked), disagreements=len(wrong), share=len(wrong) / len(picked), examples=wrong[:EXAMPLES]
    )
    return result
