"""Load a logged policy the two ways a user would and write its log-probs on given texts.

Run by pipelines/registry/parity.py in a fresh process, by path, with the project made unimportable
(the point is to load the artifacts with nothing but mlflow, torch, transformers and peft, as a
user's machine would):

    python export_probe.py OUT.safetensors < request.json

request.json: {"model_uri": "runs:/<id>/policy", "texts": ["...", ...], "device": "cpu"}. OUT gets, per text i,
`pyfunc/<i>` and `peft/<i>` (log-softmax over the vocabulary at every position, float32) and
`ids/<i>` (the token ids each way tokenized them, which must agree).
"""

import json
import sys
from pathlib import Path


def log_probs(model, tokenizer, texts):
    import torch

    out = {}
    for i, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():  # one text at a time: no padding to differ between the two loads
            logits = model(input_ids=ids.to(model.device)).logits[0].float()
        out[i] = (ids[0], torch.log_softmax(logits, dim=-1).cpu())
    return out


def main() -> None:
    # The project may be installed in this environment (pip install -e): make it unimportable here, as
    # it is on a user's machine, so that a model needing it fails the check instead of passing.
    sys.modules["pipelines"] = None

    import mlflow
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    request = json.loads(sys.stdin.read())
    texts = request["texts"]
    device = request.get("device", "cpu")

    # 1. As `mlflow.pyfunc.load_model(uri).predict(...)` loads it (base fetched from the registry).
    pyfunc = mlflow.pyfunc.load_model(request["model_uri"], model_config={"device": device}).unwrap_python_model()
    through_pyfunc = log_probs(pyfunc.model, pyfunc.tokenizer, texts)
    del pyfunc

    # 2. As plain transformers + peft load the same logged files.
    adapter = Path(mlflow.artifacts.download_artifacts(request["model_uri"]))
    model_config = mlflow.models.Model.load(str(adapter)).flavors["python_function"].get("config") or {}
    base = Path(mlflow.artifacts.download_artifacts(model_config["reference_model_uri"]))
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").exists() else base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    plain = PeftModel.from_pretrained(base_model.to(device), adapter).eval()
    through_peft = log_probs(plain, tokenizer, texts)

    tensors = {}
    for i in range(len(texts)):
        ids_a, lp_a = through_pyfunc[i]
        ids_b, lp_b = through_peft[i]
        if not torch.equal(ids_a, ids_b):
            raise SystemExit(f"text {i}: the pyfunc model's tokenizer and the adapter folder's tokenize it differently")
        tensors[f"ids/{i}"] = ids_a.contiguous()
        tensors[f"pyfunc/{i}"] = lp_a.contiguous()
        tensors[f"peft/{i}"] = lp_b.contiguous()
    save_file(tensors, sys.argv[1])


if __name__ == "__main__":
    main()
