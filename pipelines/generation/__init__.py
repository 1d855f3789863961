"""Prompts -> completions, shared by training and evaluation: the rollout interface and its backends."""
