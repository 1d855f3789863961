"""Prefect tasks: thin wrappers over pipelines/, one per stage, plus DVC versioning."""
