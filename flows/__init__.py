"""Prefect flows and the `grpo` command: the top floor of the project."""
