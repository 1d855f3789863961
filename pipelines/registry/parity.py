"""The export-parity check: before a version is registered, its logged files, loaded as a user would
load them, must give the log-probs of the policy that was evaluated, and the adapter must do something.

Exports go wrong silently: a "merged" model byte-identical to its base, an adapter saved before its
weights were filled in, a tokenizer from another model. So the logged artifacts are loaded in a
fresh process (pipelines/registry/export_probe.py, run by path with this project made unimportable
there) through `mlflow.pyfunc.load_model` and through plain transformers + peft, and
their log-probs on a few fixed texts are compared with the policy loaded here the way `evaluate`
loads it. Everything is float32 and one text at a time (no padding), so an honest export matches to
rounding; the tolerance is `registry.export_atol` on log-probabilities (log-softmax, so a constant
shift of the logits, which changes nothing, is not a difference).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROBE = Path(__file__).with_name("export_probe.py")
# An answer in the trained format after each question: the adapter's effect shows on answer tokens.
ANSWER = "17 + 25 = 42\n#### 42"


class ParityError(RuntimeError):
    """The logged model is not the evaluated policy, or its adapter does nothing; the message says which."""


@dataclass(frozen=True)
class ParityReport:
    pyfunc_max_diff: float  # max |log p| difference, mlflow.pyfunc.load_model vs the evaluated policy
    peft_max_diff: float  # ... transformers + peft from the logged files vs the evaluated policy
    adapter_effect: float  # max |log p| difference between the evaluated policy and its base model
    tolerance: float
    texts: int
    seconds: float

    def summary(self) -> str:
        return (
            f"pyfunc max |Δlog p| {self.pyfunc_max_diff:.2g}, transformers+peft {self.peft_max_diff:.2g} "
            f"(tolerance {self.tolerance:g}); adapter effect {self.adapter_effect:.3g}; {self.texts} texts, "
            f"{self.seconds:.0f} s"
        )


def probe_texts(tokenizer: Any, prompt: dict[str, Any], questions: list[str]) -> list[str]:
    """The questions as the pyfunc model prompts them (chat template + worked examples), each followed by
    an answer in the trained format."""
    from pipelines.registry.pyfunc_model import build_messages

    return [
        tokenizer.apply_chat_template(build_messages(q, prompt), add_generation_prompt=True, tokenize=False) + ANSWER
        for q in questions
    ]


def evaluated_log_probs(
    reference_dir: Path, adapter_dir: Path, texts: list[str], trust_remote_code: bool = False, device: str = "cpu"
) -> tuple[list[Any], list[Any], list[Any]]:
    """(token ids, policy log-probs, base log-probs) per text, the policy loaded as `evaluate` loads it,
    on `device` (CPU tensors out)."""
    import torch
    from peft import PeftModel

    from pipelines.snapshot.loading import load_reference

    base, tokenizer = load_reference(reference_dir, trust_remote_code, torch.device(device))
    policy = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids, with_adapter, without = [], [], []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        on_device = encoded.to(device)
        with torch.no_grad():
            with_adapter.append(torch.log_softmax(policy(input_ids=on_device).logits[0].float(), dim=-1).cpu())
            with policy.disable_adapter():
                without.append(torch.log_softmax(policy(input_ids=on_device).logits[0].float(), dim=-1).cpu())
        ids.append(encoded[0])
    return ids, with_adapter, without


def run_probe(model_uri: str, texts: list[str], timeout_s: float = 900.0, device: str = "cpu") -> dict[str, Any]:
    """The probe's tensors for `model_uri`, from a fresh process with this process's MLflow store, its
    models on `device` (the one the evaluated log-probs were computed on: the same kernels, the same rounding)."""
    import mlflow
    from safetensors.torch import load_file

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
        "MLFLOW_REGISTRY_URI": mlflow.get_registry_uri(),
    }
    env.pop("PYTHONPATH", None)  # the probe must not see this project
    with tempfile.TemporaryDirectory(prefix="grpo-parity-") as tmp:
        out = Path(tmp) / "log_probs.safetensors"
        try:
            done = subprocess.run(
                [sys.executable, str(PROBE), str(out)],
                input=json.dumps({"model_uri": model_uri, "texts": texts, "device": device}),
                capture_output=True,
                text=True,
                env=env,
                cwd=tmp,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as exc:
            raise ParityError(f"loading {model_uri} in a fresh process took over {timeout_s:.0f} s") from exc
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-8:])
            raise ParityError(f"{model_uri} does not load in a fresh process as a user would load it:\n{tail}")
        return load_file(str(out))


def adapter_effect(expected: tuple[list[Any], list[Any], list[Any]], tolerance: float, adapter_dir: Path) -> float:
    """The largest change the evaluated adapter makes to the base's log-probs; ParityError when it is
    within the tolerance (checked before anything is loaded from the registry: no export can fix it)."""
    _, policy, base = expected
    effect = max(float((want - plain).abs().max()) for want, plain in zip(policy, base, strict=True))
    if not math.isfinite(effect):
        raise ParityError(
            f"the adapter in {adapter_dir} gives non-finite log-probs (adapter effect {effect}): its weights hold NaN "
            "or inf, so training diverged; train again (lower train.learning_rate, raise train.temperature)"
        )
    if effect <= tolerance:
        raise ParityError(
            f"the adapter in {adapter_dir} does not change the base model (max |Δlog p| {effect:.2g} ≤ "
            f"registry.export_atol {tolerance:g}): it is at its initialisation (no step had a learning signal, "
            "see reward_std in training's metrics). Registering it would register the base model."
        )
    return effect


def compare(
    expected: tuple[list[Any], list[Any], list[Any]], probed: dict[str, Any], tolerance: float, model_uri: str
) -> tuple[float, float, float]:
    """(pyfunc diff, peft diff, adapter effect); raises ParityError naming the first difference found
    (an export that lost the adapter's weights shows here as a difference from the evaluated policy)."""
    import torch

    ids, policy, _ = expected
    worst = {"pyfunc": 0.0, "peft": 0.0}
    effect = adapter_effect(expected, tolerance, Path(model_uri))
    how = {"pyfunc": "mlflow.pyfunc.load_model", "peft": "transformers + peft"}
    for i, (tokens, want) in enumerate(zip(ids, policy, strict=True)):
        if not torch.equal(probed[f"ids/{i}"], tokens):
            raise ParityError(
                f"{model_uri}: the logged tokenizer splits probe text {i} differently from the evaluated policy's; "
                "the version's folder holds another tokenizer: register again from the evaluated policy folder"
            )
        for way in worst:
            got = probed[f"{way}/{i}"]
            diff = (got - want).abs()
            worst[way] = max(worst[way], float(diff.max()))
            if not worst[way] <= tolerance:  # NaN compares false: a NaN difference is a difference
                position = int(diff.max(dim=-1).values.argmax())
                raise ParityError(
                    f"{model_uri} loaded through {how[way]} differs from the evaluated policy: max |Δlog p| "
                    f"{worst[way]:.3g} > registry.export_atol {tolerance:g} (probe text {i}, token {position}). "
                    "The logged adapter is not the one `evaluate` scored: rerun `grpo evaluate` and `grpo register`, "
                    "and if it persists, compare adapter_model.safetensors in the run's artifacts with the policy's"
                )
    return worst["pyfunc"], worst["peft"], effect


@dataclass(frozen=True)
class Expected:
    """The evaluated policy's log-probs on the probe texts (and its base's), computed before anything is logged."""

    texts: list[str]
    log_probs: tuple[list[Any], list[Any], list[Any]]
    tolerance: float
    effect: float
    seconds: float
    device: str = "cpu"


def expect(
    reference_dir: Path,
    adapter_dir: Path,
    prompt: dict[str, Any],
    questions: list[str],
    tolerance: float,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> Expected:
    """What the logged version must reproduce; ParityError at once when the adapter is a no-op."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    texts = probe_texts(AutoTokenizer.from_pretrained(reference_dir), prompt, questions)
    log_probs = evaluated_log_probs(reference_dir, adapter_dir, texts, trust_remote_code, device)
    effect = adapter_effect(log_probs, tolerance, adapter_dir)
    return Expected(texts, log_probs, tolerance, effect, time.perf_counter() - start, device)


def check(expected: Expected, model_uri: str) -> ParityReport:
    """Load `model_uri` as a user would (fresh process) and compare with `expected`; raises ParityError."""
    start = time.perf_counter()
    probed = run_probe(model_uri, expected.texts, device=expected.device)
    pyfunc_diff, peft_diff, effect = compare(expected.log_probs, probed, expected.tolerance, model_uri)
    seconds = expected.seconds + time.perf_counter() - start
    return ParityReport(pyfunc_diff, peft_diff, effect, expected.tolerance, len(expected.texts), seconds)
