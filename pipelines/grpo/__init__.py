"""The GRPO training engine: rollout, rewards, advantages, loss, trainer."""
