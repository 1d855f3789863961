"""Which prompts each step sees: a seeded shuffle per epoch, with a state that checkpoints restore.

With selective rollouts (GRESO, Zheng et al. 2025, arXiv 2506.02177) the sampler also remembers,
per prompt, how many of its most recent groups in a row had all-equal rewards, and skips such a
prompt *before* it is sampled with probability 1 - explore ** streak. Their observation, which
holds here too (a sharpened policy answers a solved problem the same way every time): a prompt
that gave no gradient at its last visit very likely gives none at the next, so sampling it again
mostly buys a group that dynamic sampling throws away. `explore` keeps every prompt reachable,
so one that becomes informative again (the policy regressed on it) is found. GRESO also tunes
`explore` online towards a target share of flat groups; here it is a fixed setting.
"""

from __future__ import annotations

import random
from typing import Any

# A streak longer than this skips no more often: with explore 0.5 a prompt is still drawn 1 time
# in 16, so a pass over a dataset where everything is flat still ends.
MAX_STREAK = 4


class PromptSampler:
    """Endless batches of rows; `state_dict()` captures the exact position for resume.

    >>> s = PromptSampler([{"id": str(i)} for i in range(4)], seed=0, explore=0.0)
    >>> first = s.take(4)
    >>> s.record(first, [r["id"] != "2" for r in first])  # every group flat but prompt 2's
    >>> [r["id"] for r in s.take(3)], s.skipped > 0  # with explore 0 the flat ones are never drawn again
    (['2', '2', '2'], True)
    """

    def __init__(self, rows: list[dict[str, Any]], seed: int, explore: float = 1.0) -> None:
        self.rows = rows
        self.rng = random.Random(seed)
        self.queue: list[int] = []  # indices left in the current epoch, next one last
        self.epoch = 0
        # Selective rollouts: 1.0 = off (every prompt is drawn in its turn).
        self.explore = explore
        self.flat_streak: dict[int, int] = {}  # row index -> flat groups in a row at its latest visits
        self.skipped = 0  # prompts passed over so far, over the whole run
        self._index = {id(row): i for i, row in enumerate(rows)}

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n:
            if not self.queue:
                self.queue = list(range(len(self.rows)))
                self.rng.shuffle(self.queue)
                self.epoch += 1
            index = self.queue.pop()
            streak = min(self.flat_streak.get(index, 0), MAX_STREAK)
            # Only a prompt with a streak costs a random draw, so with selective rollouts off (or
            # before anything was flat) the stream of prompts is exactly the plain shuffle's.
            if self.explore < 1.0 and streak and self.rng.random() >= self.explore**streak:
                self.skipped += 1
                continue
            out.append(self.rows[index])
        return out

    def record(self, rows: list[dict[str, Any]], flat: list[bool]) -> None:
        """What the groups of `rows` (as `take` returned them) gave: `flat[i]` when all rewards were equal."""
        for row, is_flat in zip(rows, flat, strict=True):
            index = self._index[id(row)]
            self.flat_streak[index] = self.flat_streak.get(index, 0) + 1 if is_flat else 0

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "queue": list(self.queue),
            "epoch": self.epoch,
            # JSON keys are strings; only non-zero streaks matter.
            "flat_streak": {str(i): k for i, k in self.flat_streak.items() if k},
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.queue = list(state["queue"])
        self.epoch = int(state["epoch"])
        self.flat_streak = {int(i): int(k) for i, k in state.get("flat_streak", {}).items()}
        self.skipped = int(state.get("skipped", 0))
