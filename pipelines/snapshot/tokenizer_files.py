"""Save a tokenizer so that its files hold what it is, not how this process happened to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# transformers writes the keyword arguments a tokenizer was loaded with into tokenizer_config.json:
# `local_files_only` follows HF_HUB_OFFLINE, so the same model pinned from two shells had two
# sha256s. None of these says anything about the tokenizer; from_pretrained sets each anew.
LOAD_TIME_KEYS = ("local_files_only", "is_local", "cache_dir", "force_download", "proxies", "token", "_commit_hash")


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    config_file = Path(folder) / "tokenizer_config.json"
    if not config_file.exists():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    kept = {key: value for key, value in config.items() if key not in LOAD_TIME_KEYS}
    if kept != config:
        # the layout transformers itself writes (indent 2, keys in its order, a final newline)
        config_file.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
