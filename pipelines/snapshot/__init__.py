"""Stage 2, snapshot: resolve the reference model, pin it (safetensors + sha256 manifest), load it."""
