"""Pictures people would rather look at than read: training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.io import replaced_file


def training_curves(history: list[dict[str, float]], out: Path, scores: Sequence[Any] = ()) -> Path | None:
    """Reward (and each reward function's mean) against training wall time, with validation accuracy
    (strict and lenient, grpo/validation.py) where it was measured; step time below."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    # Wall time, not steps, on the x axis: what a user pays for is minutes of machine time.
    steps = [h.get("wall_time", h["step"]) / 60 for h in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    top.plot(steps, [h["reward"] for h in history], label="reward (weighted sum)", linewidth=2)
    for key in sorted(k for k in history[0] if k.startswith("rewards/")):
        top.plot(steps, [h[key] for h in history], label=key.removeprefix("rewards/").removesuffix("/mean"), alpha=0.8)
    if scores:
        # Reward rising while these fall is the decline the alarm is about: one picture shows both.
        wall = {int(h["step"]): h.get("wall_time", h["step"]) / 60 for h in history}
        at = [wall.get(s.step, 0.0) for s in scores]
        top.plot(at, [s.accuracy for s in scores], "o-", color="black", label="validation accuracy")
        top.plot(at, [s.lenient_accuracy for s in scores], "o--", color="grey", label="validation, lenient")
    top.set_ylabel("mean reward / accuracy")
    top.legend(loc="lower right")
    top.grid(alpha=0.3)
    bottom.plot(steps, [h["step_time"] for h in history], color="grey")
    bottom.set_ylabel("step time (s)")
    bottom.set_xlabel("training wall time (min)")
    bottom.grid(alpha=0.3)
    fig.suptitle("GRPO training")
    fig.tight_layout()
    with replaced_file(out) as tmp:  # beside it, then one rename: a reader never sees half a PNG
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
