"""Load the pinned reference and the policy (reference + LoRA adapter) from their folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.config import LoraConfig


def set_threads(num_threads: int) -> None:
    import torch

    if num_threads > 0:
        torch.set_num_threads(num_threads)


def load_reference(folder: Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a snapshot folder; weights only from safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model.eval()
    return model, tokenizer


def add_lora(model: Any, cfg: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    config = PeftLora(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def load_policy(reference: Path, adapter: Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The trained policy: the reference with the saved LoRA adapter on top."""
    from peft import PeftModel

    base, tokenizer = load_reference(reference, trust_remote_code)
    model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    return model, tokenizer
