"""Deterministic train/eval split by a hash of the row id: stable when rows are added or reordered."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


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
