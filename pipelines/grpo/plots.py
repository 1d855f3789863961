"""Pictures people would rather look at than read: training curves."""

from __future__ import annotations

from pathlib import Path


def training_curves(history: list[dict[str, float]], out: Path) -> Path | None:
    """Reward (and each reward function's mean) against training wall time, step time below."""
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
    top.set_ylabel("mean reward")
    top.legend(loc="lower right")
    top.grid(alpha=0.3)
    bottom.plot(steps, [h["step_time"] for h in history], color="grey")
    bottom.set_ylabel("step time (s)")
    bottom.set_xlabel("training wall time (min)")
    bottom.grid(alpha=0.3)
    fig.suptitle("GRPO training")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
