"""Deterministic train/eval split by a hash of the row id: stable when rows are added or reordered."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _unit(seed: int | str, row_id: str) -> float:
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_ids(
    ids: Sequence[str], eval_fraction: float, max_eval_rows: int, seed: int | str
) -> tuple[list[int], list[int]]:
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


def three_way(
    ids: Sequence[str], eval_fraction: float, max_eval_rows: int, val_fraction: float, max_val_rows: int, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """(train, val, eval) positions. Eval is taken first, exactly as a two-way split takes it, so
    adding a validation split never moves a test row; val comes from the rest by another hash.

    >>> train, val, ev = three_way([str(i) for i in range(100)], 0.2, 10, 0.1, 5, 0)
    >>> len(train), len(val), len(ev), len(set(train) | set(val) | set(ev))
    (85, 5, 10, 100)
    >>> three_way([str(i) for i in range(100)], 0.2, 10, 0.0, 5, 0)[2] == ev
    True
    """
    rest, held_out = split_ids(ids, eval_fraction, max_eval_rows, seed)
    if val_fraction <= 0 or max_val_rows <= 0:
        return rest, [], held_out
    train_pos, val_pos = split_ids([ids[p] for p in rest], val_fraction, max_val_rows, f"val:{seed}")
    return [rest[p] for p in train_pos], [rest[p] for p in val_pos], held_out
