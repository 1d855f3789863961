"""`grpo ask`: load a registered version through its MLflow pyfunc flavour and answer a question.

This is what any client does with only mlflow, torch, transformers and peft installed:
`mlflow.pyfunc.load_model("models:/<name>/<version>").predict([question])`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.mlflow_store import registry_client
from pipelines.registry.promotion import PromotionError, get_version


@dataclass
class Answer:
    name: str
    version: str
    alias: str | None
    question: str
    answer: str


def ask(
    question: str,
    *,
    root: Path,
    name: str,
    alias: str | None = "champion",
    version: str | None = None,
    max_new_tokens: int | None = None,
) -> Answer:
    """The greedy answer of `name@alias` (or `name` version `version`) to `question`."""
    import mlflow

    client = registry_client(root)
    if version is None:
        if alias is None:
            raise PromotionError("name a version or an alias, e.g. --alias champion")
        try:
            found = client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException as exc:
            raise PromotionError(
                f"{name} has no version with alias {alias!r}; `grpo models` lists the aliases"
            ) from exc
        version = str(found.version)
    else:
        get_version(client, name, version)
        alias = None
    # Load the version found, not the alias again: should the alias move meanwhile, the answer still
    # comes from the version this function reports.
    overrides = {"max_new_tokens": max_new_tokens} if max_new_tokens else None
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}", model_config=overrides)
    except mlflow.exceptions.MlflowException as exc:
        if "MLmodel" in str(exc):
            raise PromotionError(
                f"{name} v{version} has no pyfunc flavour (registered before it existed); load it with transformers + "
                "peft as the README shows, or register it again"
            ) from exc
        raise
    text = model.predict([question])[0]
    return Answer(name=name, version=version, alias=alias, question=question, answer=text)
