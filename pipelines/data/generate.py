"""Built-in, seeded task generators: verifiable problems without any download."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

from pipelines.config import GeneratorConfig

_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_NAMES = {"+": "add", "-": "sub", "*": "mul"}


def arithmetic(cfg: GeneratorConfig) -> Iterator[dict[str, Any]]:
    """Distinct `a op b` problems in a seeded random order, at most `cfg.num_rows` of them.

    Every problem appears once, so a split by id is also a split by problem (no leakage).

    >>> rows = list(arithmetic(GeneratorConfig(operators=["+"], a_min=1, a_max=2, b_min=3, b_max=3, num_rows=5)))
    >>> sorted(r["prompt"] for r in rows)
    ['What is 1 + 3?', 'What is 2 + 3?']
    """
    space = [
        (a, op, b)
        for op in cfg.operators
        for a, b in itertools.product(range(cfg.a_min, cfg.a_max + 1), range(cfg.b_min, cfg.b_max + 1))
    ]
    random.Random(cfg.seed).shuffle(space)
    for a, op, b in space[: cfg.num_rows]:
        yield {
            "id": f"{_NAMES[op]}-{a}-{b}",
            "prompt": f"What is {a} {op} {b}?",
            "answer": str(_APPLY[op](a, b)),
        }
