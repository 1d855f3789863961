"""Stage 3, train: the GRPO engine (prompt sampling, rewards, advantages, loss, the trainer)."""
