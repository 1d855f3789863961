"""The model being trained: the pinned reference plus a LoRA adapter, or all of it (full fine-tuning)."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from pipelines.config import Config, LoraConfig
from pipelines.device import place
from pipelines.paths import Paths
from pipelines.snapshot.loading import load_reference
from pipelines.snapshot.tokenizer_files import save_tokenizer


def build(cfg: Config, paths: Paths, device: torch.device | None = None) -> tuple[Any, Any, Any | None]:
    """(policy, tokenizer, frozen reference or None), on `device` (the CPU by default).

    With LoRA the reference is the same model with the adapter disabled, so no second copy is
    kept; with full fine-tuning a frozen copy is kept only when the KL term needs it (beta > 0).
    Trainable weights stay fp32 on every device (bf16 is autocast), so the optimiser state is fp32.
    """
    device = torch.device("cpu") if device is None else device
    model, tokenizer = load_reference(paths.reference_dir, cfg.snapshot.trust_remote_code)
    if cfg.train.lora.enabled:
        model = add_lora(model, cfg.train.lora)
        if cfg.train.bf16:
            _frozen_linears_to_bf16(model)
        checkpointing(model, cfg.train.gradient_checkpointing)
        return place(model, device), tokenizer, None
    reference = None
    if cfg.train.beta != 0.0:
        reference = place(copy.deepcopy(model).eval(), device)
        reference.requires_grad_(False)
    model.requires_grad_(True)
    checkpointing(model, cfg.train.gradient_checkpointing)
    return place(model, device), tokenizer, reference


def checkpointing(model: Any, enabled: bool) -> None:
    """transformers' gradient checkpointing, non-reentrant: a frozen embedding (LoRA) needs no
    `enable_input_require_grads` hook then, and the recomputed forward sees the same autocast."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
