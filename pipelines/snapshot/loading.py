"""Load the pinned reference (model and tokenizer) from its snapshot folder, weights from safetensors only."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_reference(folder: Path, trust_remote_code: bool = False, device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a snapshot folder; weights only from safetensors; on `device` if given
    (pipelines/device.py), else the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model.eval()
    if device is not None:
        from pipelines.device import place

        model = place(model, device)
    return model, tokenizer
