"""Which prompts each step sees: a seeded shuffle per epoch, with a state that checkpoints restore."""

from __future__ import annotations

import random
from typing import Any


class PromptSampler:
    """Endless batches of rows; `state_dict()` captures the exact position for resume."""

    def __init__(self, rows: list[dict[str, Any]], seed: int) -> None:
        self.rows = rows
        self.rng = random.Random(seed)
        self.queue: list[int] = []  # indices left in the current epoch, next one last
        self.epoch = 0

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n:
            if not self.queue:
                self.queue = list(range(len(self.rows)))
                self.rng.shuffle(self.queue)
                self.epoch += 1
            out.append(self.rows[self.queue.pop()])
        return out

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "queue": list(self.queue), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.queue = list(state["queue"])
        self.epoch = int(state["epoch"])
