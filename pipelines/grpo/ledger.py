"""The rollout ledger: every kept training step's completions, one Parquet file per step.

`ledger/step-00000012.parquet` holds step 12's rollouts, one row per completion, with the columns
in `SCHEMA` plus one `reward_<name>` column per reward function (null where it said None). The
folder reads as one table: `pandas.read_parquet("ledger")`. A step's file is written whole and
renamed into place, so a reader never sees half of one; a step that is run again (after a resume)
overwrites its file, and files of later steps (left by a run that went further before it was cut)
are removed when their step is reached, so the ledger never holds a step twice. `train.ledger_every`
keeps every Nth step (0 = none). With several processes every one builds the table of the groups it
sampled and rank 0 writes them together (`merge`): the ledger is the whole batch's, as with one.

The questions it answers (`grpo ledger`, or pandas as in docs/data-and-tasks.md): which prompts stayed flat
(`flat_prompts`), how a prompt's completions changed (`prompt_history`), which completions got the
highest advantage (`top_advantages`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PART = re.compile(r"step-(\d+)\.parquet")

SCHEMA = [
    pa.field("step", pa.int32()),
    pa.field("prompt_id", pa.string()),
    pa.field("group", pa.int32()),  # the prompt's group in this step's batch
    pa.field("completion", pa.int32()),  # the completion's index within its group
    pa.field("completion_ids", pa.list_(pa.int32())),
    pa.field("text", pa.string()),
    pa.field("sampler_logps", pa.list_(pa.float32())),  # null when the backend reports none
    pa.field("reward", pa.float64()),  # the weighted sum the advantage is computed from
    pa.field("advantage", pa.float64()),
    pa.field("truncated", pa.bool_()),
    # A multi-turn episode's turns as JSON (each: text, call, result, error, seconds); null for one turn.
    # `text` above is the last turn's: the answer the rewards read.
    pa.field("turns", pa.string()),
]


def ledger_dir(root: Path) -> Path:
    return root / "ledger"


def part_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}.parquet"


def parts(folder: Path) -> dict[int, Path]:
    """{step: file} of the ledger's part files."""
    if not folder.exists():
        return {}
    return {int(m.group(1)): p for p in folder.iterdir() if (m := PART.fullmatch(p.name))}


def table(
    step: int,
    rows: list[dict[str, Any]],
    rollout: Any,
    per_function: Any,
    reward_names: list[str],
    rewards: Any,
    advantages: Any,
    positions: Any = None,
) -> pa.Table:
    """One step's rollouts as a table. `per_function` (completions, functions; NaN = None), `rewards`
    and `advantages` are this process's rows, in the rollout's order (group after group);
    `positions` are their places in the whole batch (default: the whole batch is here)."""
    G = rollout.group_size
    n = len(rollout.texts)
    places = list(range(n)) if positions is None else [int(p) for p in positions]
    ids = rollout.completion_token_lists()
    mask = rollout.completion_mask.bool()
    logps = (
        [None] * n
        if rollout.sampler_logps is None
        else [lp[m].float().tolist() for lp, m in zip(rollout.sampler_logps, mask, strict=True)]
    )
    scores = per_function.double().tolist()
    columns: dict[str, Any] = {
        "step": [step] * n,
        "prompt_id": [str(rows[i // G].get("id", i // G)) for i in range(n)],
        "group": [p // G for p in places],
        "completion": [p % G for p in places],
        "completion_ids": ids,
        "text": list(rollout.texts),
        "sampler_logps": logps,
        "reward": rewards.double().tolist(),
        "advantage": advantages.double().tolist(),
        "truncated": rollout.truncated.bool().tolist(),
        "turns": [None] * n if rollout.episodes is None else [json.dumps(e, sort_keys=True) for e in rollout.episodes],
    }
    fields = list(SCHEMA)
    for j, name in enumerate(reward_names):
        columns[f"reward_{name}"] = [None if s[j] != s[j] else s[j] for s in scores]  # NaN -> null
        fields.append(pa.field(f"reward_{name}", pa.float64()))
    return pa.table(columns, schema=pa.schema(fields))


def keeps(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def merge(tables: list[pa.Table]) -> pa.Table:
    """The processes' tables of one step as one, in the batch's order."""
    return pa.concat_tables(tables).sort_by([("group", "ascending"), ("completion", "ascending")])


def record(folder: Path, step: int, every: int, make_table: Any) -> Path | None:
    """Write step `step`'s part when `every` keeps it (`make_table()` builds it), and remove parts
    of this step and later ones left by an earlier run. Returns the file written, if any."""
    folder.mkdir(parents=True, exist_ok=True)  # the DVC out exists even when nothing is kept
    keep = keeps(step, every)
    for s, path in parts(folder).items():
        if s > step or (s == step and not keep):
            path.unlink(missing_ok=True)
    if not keep:
        return None
    target = part_path(folder, step)
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(make_table(), tmp, compression="zstd")
    os.replace(tmp, target)
    return target


def read(folder: Path) -> Any:
    """The whole ledger as one pandas DataFrame, ordered by step, group and completion."""
    import pandas as pd

    files = [p for _, p in sorted(parts(folder).items())]
    if not files:
        return pd.DataFrame(columns=[f.name for f in SCHEMA])
    frame = pa.concat_tables([pq.read_table(p) for p in files], promote_options="default").to_pandas()
    return frame.sort_values(["step", "group", "completion"], kind="stable").reset_index(drop=True)


def flat_prompts(frame: Any) -> list[str]:
    """Prompts whose rewards were all equal at every visit (their groups never carried a gradient)."""
    spread = frame.groupby(["prompt_id", "step"])["reward"].nunique(dropna=False)
    flat = (spread <= 1).groupby(level="prompt_id").all()
    return sorted(flat[flat].index)


def prompt_history(frame: Any, prompt_id: str) -> Any:
    """A prompt's completions step by step: text, reward, advantage."""
    rows = frame[frame["prompt_id"] == prompt_id]
    return rows[["step", "completion", "reward", "advantage", "truncated", "text"]]


def top_advantages(frame: Any, n: int = 10) -> Any:
    """The `n` completions with the highest advantage."""
    return frame.nlargest(n, "advantage")[["step", "prompt_id", "completion", "reward", "advantage", "text"]]


def answer(folder: Path, question: str, prompt_id: str | None = None, n: int = 10) -> str:
    """`grpo ledger`'s text: `flat`, `history` (of `prompt_id`) or `top` (`n` highest advantages)."""
    import pandas as pd

    frame = read(folder)
    if frame.empty:
        return f"no ledger in {folder}: run `grpo train` with train.ledger_every > 0"
    if question == "flat":
        flat = flat_prompts(frame)
        visits = frame.groupby("prompt_id")["step"].nunique()
        lines = [f"{p}\t{visits[p]} visit(s)" for p in flat]
        return "\n".join([f"{len(flat)} of {len(visits)} prompts stayed flat at every visit", *lines])
    with pd.option_context("display.max_colwidth", 80, "display.width", 200):
        if question == "history":
            if prompt_id is None or prompt_id not in set(frame["prompt_id"]):
                return f"prompt id {prompt_id!r} is not in the ledger"
            return prompt_history(frame, prompt_id).to_string(index=False)
        return top_advantages(frame, n).to_string(index=False)
