"""Deterministic train/eval split by a hash of the row id: stable when rows are added or reordered."""

from __future__ import annotations

import hashlib
from typing import Any


def _unit(seed: int, row_id: str) -> float:
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_rows(
    rows: list[dict[str, Any]], eval_fraction: float, max_eval_rows: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval). Eval holds the rows hashing below `eval_fraction`, at most `max_eval_rows`
    of them (the lowest hashes); every other row is train, so nothing is dropped.

    >>> train, ev = split_rows([{"id": str(i)} for i in range(100)], 0.2, 5, 0)
    >>> len(train), len(ev), {r["id"] for r in train} & {r["id"] for r in ev}
    (95, 5, set())
    """
    keyed = sorted(rows, key=lambda r: _unit(seed, str(r["id"])))
    n_eval = min(max_eval_rows, sum(1 for r in keyed if _unit(seed, str(r["id"])) < eval_fraction))
    eval_ids = {str(r["id"]) for r in keyed[:n_eval]}
    train = [r for r in rows if str(r["id"]) not in eval_ids]
    evaluation = [r for r in rows if str(r["id"]) in eval_ids]
    return train, evaluation
