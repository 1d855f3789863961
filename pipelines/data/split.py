"""Deterministic train/eval split by a hash of the row id: stable when rows are added or reordered."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any


def _unit(seed: int, row_id: str) -> float:
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_ids(ids: Sequence[str], eval_fraction: float, max_eval_rows: int, seed: int) -> tuple[list[int], list[int]]:
    """(train positions, eval positions), each in the original order. Eval holds the ids hashing
    below `eval_fraction`, at most `max_eval_rows` of them (the lowest hashes); every other
    position is train, so nothing is dropped.

    >>> split_ids(["a", "b", "c", "d"], 0.5, 1, 0)
    ([0, 1, 2], [3])
    """
    units = [_unit(seed, str(i)) for i in ids]
    below = sorted((u, pos) for pos, u in enumerate(units) if u < eval_fraction)
    eval_positions = sorted(pos for _, pos in below[:max_eval_rows])
    chosen = set(eval_positions)
    return [pos for pos in range(len(units)) if pos not in chosen], eval_positions


def split_rows(
    rows: list[dict[str, Any]], eval_fraction: float, max_eval_rows: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) rows, split by `split_ids` on their `id`.

    >>> train, ev = split_rows([{"id": str(i)} for i in range(100)], 0.2, 5, 0)
    >>> len(train), len(ev), {r["id"] for r in train} & {r["id"] for r in ev}
    (95, 5, set())
    """
    train, evaluation = split_ids([str(r["id"]) for r in rows], eval_fraction, max_eval_rows, seed)
    return [rows[i] for i in train], [rows[i] for i in evaluation]
