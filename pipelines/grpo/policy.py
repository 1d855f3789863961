"""The model being trained: the pinned reference plus a LoRA adapter, or all of it (full fine-tuning)."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from pipelines.config import Config, LoraConfig
from pipelines.paths import Paths
from pipelines.snapshot.loading import load_reference
from pipelines.snapshot.tokenizer_files import save_tokenizer


def build(cfg: Config, paths: Paths) -> tuple[Any, Any, Any | None]:
    """(policy, tokenizer, frozen reference or None).

    With LoRA the reference is the same model with the adapter disabled, so no second copy is
    kept; with full fine-tuning a frozen copy is kept only when the KL term needs it (beta > 0).
    """
    model, tokenizer = load_reference(paths.reference_dir, cfg.snapshot.trust_remote_code)
    if cfg.train.lora.enabled:
        model = add_lora(model, cfg.train.lora)
        if cfg.train.bf16:
            _frozen_linears_to_bf16(model)
        return model, tokenizer, None
    reference = None
    if cfg.train.beta != 0.0:
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
    model.requires_grad_(True)
    return model, tokenizer, reference


def add_lora(model: Any, cfg: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    config = PeftLora(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def reference_view(model: Any, reference: Any | None) -> tuple[Any, AbstractContextManager[Any]]:
    """(module to score with, context) giving the reference's log-probs."""
    if reference is not None:
        return reference, nullcontext()
    return model, model.disable_adapter()


# What an adapter names as its base: the project-relative folder (as dvc.yaml names it), not the absolute
# path peft would write, which made the same weights trained in another folder (a clone, `dvc exp run
# --temp`) different bytes, and so a change for DVC.
BASE_MODEL = "models/reference"


def save(model: Any, tokenizer: Any, folder: Any) -> None:
    """The adapter in peft's format, or the full weights as safetensors, plus the tokenizer."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.name_or_path = base.config.name_or_path = BASE_MODEL  # what peft's model card names
    for adapter in getattr(model, "peft_config", {}).values():
        adapter.base_model_name_or_path = BASE_MODEL
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _frozen_linears_to_bf16(model: Any) -> None:
    """Store the frozen weights under each LoRA layer in bf16.

    bf16 autocast casts every fp32 weight to bf16 at every forward and backward (a full copy of
    the model each pass); storing the frozen ones in bf16 gives the same matmul numerics without
    the copies, and halves their memory. Norms, embeddings and the adapter stay in fp32.
    """
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.get_base_layer().to(torch.bfloat16)
