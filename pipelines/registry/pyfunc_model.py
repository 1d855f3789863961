"""The MLflow pyfunc flavour of a registered policy: base model + LoRA adapter that answers questions.

MLflow copies this one file into every registered version ("models from code") and runs it when
the version is loaded, so it must stand alone: it imports mlflow, torch, transformers and peft,
never this project. The adapter (peft format) and its tokenizer lie beside it in the version's
folder; the base model is the pinned reference, fetched from the registry by `reference_model_uri`
unless `base_path` names a local copy. Either way its sha256 is checked against the one the adapter
was trained on.

    model = mlflow.pyfunc.load_model("models:/grpo-policy@champion")
    model.predict(["What is 17 + 25?"])        # -> ["17 + 25 = 42\\n#### 42"]
    model.predict(["What is 17 + 25?"], params={"max_new_tokens": 32})

Each version carries its signature (a list of questions in, one answer each out, an optional
`max_new_tokens`) and an input example, which MLflow's UI and `mlflow models serve` show.
"""

# No `from __future__ import annotations`: MLflow reads predict's type hints as objects (TypeFromExample).
import hashlib
import json
from pathlib import Path
from typing import Any

# The input example when the registering project has no test question to show.
EXAMPLE_QUESTION = "What is 17 + 25?"


def build_messages(question: str, prompt: dict[str, Any]) -> list[dict[str, str]]:
    """The chat turns the policy was trained on: system prompt, worked examples, instruction.

    The same rule as pipelines/data/prompts.py, repeated here because this file runs without the
    project installed.

    >>> build_messages("What is 1 + 1?", {"instruction": "{question} Answer after ####.", "examples": []})
    [{'role': 'user', 'content': 'What is 1 + 1? Answer after ####.'}]
    """
    instruction = prompt.get("instruction") or "{question}"
    fill = lambda q: instruction.replace("{question}", q)  # noqa: E731 - str.replace: questions may hold braces
    messages: list[dict[str, str]] = []
    if prompt.get("system"):
        messages.append({"role": "system", "content": prompt["system"]})
    for example in prompt.get("examples") or []:
        messages.append({"role": "user", "content": fill(example["question"])})
        messages.append({"role": "assistant", "content": example["answer"]})
    messages.append({"role": "user", "content": fill(question)})
    return messages


def folder_sha256(folder: Path) -> str:
    """The digest `grpo snapshot` wrote in manifest.json, recomputed from the files themselves."""
    manifest = json.loads((folder / "manifest.json").read_text())
    lines = []
    for name in sorted(manifest["files"]):
        h = hashlib.sha256()
        with (folder / name).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        lines.append(f"{name}:{h.hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def signature() -> Any:
    """Questions (strings) in, answers (strings) out; `max_new_tokens` as a parameter (None: the version's own).

    Given explicitly so that MLflow does not load the model to infer it while saving.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", None)]),
    )


def policy_model() -> Any:
    """A new pyfunc model object. The class is made here so that importing this file needs no mlflow."""
    import mlflow.pyfunc
    from mlflow.types.type_hints import TypeFromExample

    class GrpoPolicy(mlflow.pyfunc.PythonModel):
        """Greedy answers of base + adapter to plain-text questions."""

        def load_context(self, context: Any) -> None:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            config = dict(context.model_config or {})
            adapter = Path(__file__).resolve().parent  # MLflow runs this file from the version's folder
            base = Path(config.get("base_path") or mlflow.artifacts.download_artifacts(config["reference_model_uri"]))
            expected = config.get("reference_sha256")
            if expected and folder_sha256(base) != expected:
                raise mlflow.MlflowException(
                    f"base model at {base} is not the reference this adapter was trained on (sha256 {expected}); "
                    f"load it from {config['reference_model_uri']} or pass that model as base_path"
                )
            self.tokenizer = AutoTokenizer.from_pretrained(
                adapter if (adapter / "tokenizer_config.json").exists() else base
            )
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
            # The GPU where there is one; `load_model(uri, model_config={"device": "cpu"})` chooses.
            device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = PeftModel.from_pretrained(base_model.to(device), adapter).eval()
            self.config = config

        # TypeFromExample: MLflow hands predict a list again, like the input example (not a DataFrame).
        def predict(
            self, context: Any, model_input: TypeFromExample, params: dict[str, Any] | None = None
        ) -> list[str]:
            import torch

            max_new_tokens = int((params or {}).get("max_new_tokens") or self.config.get("max_new_tokens") or 64)
            prompt = self.config.get("prompt") or {}
            texts = [
                self.tokenizer.apply_chat_template(
                    build_messages(str(q), prompt), add_generation_prompt=True, tokenize=False
                )
                for q in model_input
            ]
            self.tokenizer.padding_side = "left"
            encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = self.model.generate(
                    **encoded.to(self.model.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
            width = encoded["input_ids"].shape[1]
            return [t.strip() for t in self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]

    return GrpoPolicy()


# MLflow's loader executes this file under a module name of its own and takes the object given to
# set_model; imported as part of this project (tests, doctests) the file only defines functions.
if not __name__.startswith("pipelines."):
    import mlflow.models

    mlflow.models.set_model(policy_model())
