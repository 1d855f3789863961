"""Talking to a vLLM server over its OpenAI-compatible HTTP API: health, LoRA adapters, completions.

Completions are asked for as token ids in and token ids out (`prompt` as a list of ids,
`return_token_ids`), with the sampled tokens' log-probabilities (`logprobs: 0`; the server runs with
`--logprobs-mode processed_logprobs`, so they are of the distribution sampled from, after
temperature, top-k and top-p). Every answer is checked: a completion that is missing, empty of ids
or short of log-probs is an error, never an empty completion.

Transient failures (connection reset, 502/503/504, a timeout on a health check) are retried a few
times with backoff; a server that refuses connections or answers 500 is reported at once, with its
URL and what to do.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

TRANSIENT_STATUS = {502, 503, 504}


# A line of a server log that says what went wrong (Python's exception lines, vLLM's own error lines).
ERROR_LINE = re.compile(r"\b(\w*Error|\w*Exception|Unsupported)\b")


def server_error_line(log: Path, tail_bytes: int = 64_000) -> str | None:
    """The last line of the server's log that names an error, trimmed; None when there is none (or no log)."""
    try:
        with log.open("rb") as fh:
            fh.seek(max(0, log.stat().st_size - tail_bytes))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    found = [line.strip() for line in lines if ERROR_LINE.search(line)]
    return found[-1][:300] if found else None


class VLLMError(RuntimeError):
    """The vLLM server cannot do what was asked; the message names the server and the fix."""


@dataclass(frozen=True)
class Completion:
    ids: list[int]
    logps: list[float]
    finish_reason: str | None


class VLLMClient:
    def __init__(self, url: str, timeout_s: float = 600.0, log_hint: str = "", retries: int = 3) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.log_hint = log_hint  # where the server's own log is, for error messages
        self.retries = retries
        # A server started with --api-key (infra/docker-compose.yml) wants the key on every request.
        key = os.environ.get("VLLM_API_KEY", "").strip()
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0), headers=headers)

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, json=body)
            except httpx.ConnectError as exc:
                raise self._error(f"is not answering ({exc})", "start it, or check runtime.vllm.url") from None
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as exc:
                if attempt == self.retries:
                    raise self._error(
                        f"dropped the connection {attempt + 1} times ({exc})", "check the server"
                    ) from None
            except httpx.TimeoutException:
                raise self._error(
                    f"did not answer {method} {path} within {self.timeout_s:g} s",
                    "raise runtime.vllm.request_timeout_s or check the server's load",
                ) from None
            else:
                if response.status_code not in TRANSIENT_STATUS or attempt == self.retries:
                    return response
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _error(self, what: str, fix: str) -> VLLMError:
        where = f" (its log: {self.log_hint})" if self.log_hint else ""
        return VLLMError(f"vLLM server at {self.url} {what}{where}. Fix: {fix}")

    def _json(self, response: httpx.Response, what: str) -> Any:
        if response.status_code != 200:
            # vLLM answers an engine failure with a bare "EngineCore encountered an issue"; the cause is in its log.
            cause = server_error_line(Path(self.log_hint)) if self.log_hint else None
            said = f"; the server's log says: {cause}" if cause else ""
            raise self._error(
                f"refused {what}: HTTP {response.status_code} {response.text[:500]}{said}", "see the server's message"
            )
        try:
            return response.json()
        except ValueError:
            raise self._error(
                f"answered {what} with something that is not JSON: {response.text[:200]!r}", "check the URL"
            ) from None

    # ------------------------------------------------------------------ API

    def healthy(self) -> bool:
        try:
            return self._http.get("/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[str]:
        data = self._json(self._request("GET", "/v1/models"), "the model list")
        return [m["id"] for m in data.get("data", [])]

    def load_adapter(self, name: str, path: str) -> None:
        """Load a peft adapter folder (readable by the server) under `name`; sampling names it after this."""
        response = self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if response.status_code != 200:
            raise self._error(
                f"did not load adapter {name} from {path}: HTTP {response.status_code} {response.text[:500]}",
                "start the server with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, with "
                "--max-lora-rank at least train.lora.r, and make the folder readable by it",
            )

    def unload_adapter(self, name: str) -> None:
        self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})  # best effort: a miss is harmless

    def complete(self, model: str, prompt: list[int], n: int, sampling: dict[str, Any]) -> list[Completion]:
        """`n` completions of one tokenised prompt, with the sampled tokens' log-probs."""
        body = {
            "model": model,
            "prompt": prompt,
            "n": n,
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,
            **sampling,
        }
        data = self._json(self._request("POST", "/v1/completions", body), f"a completion request for {model}")
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise self._error(f"answered {len(choices)} completions where {n} were asked for", "check the server")
        out = []
        for choice in choices:
            ids = choice.get("token_ids")
            logps = (choice.get("logprobs") or {}).get("token_logprobs")
            if not isinstance(ids, list) or not isinstance(logps, list) or len(ids) != len(logps) or not ids:
                raise self._error(
                    "answered a completion without token ids and their log-probs", "use a vLLM with return_token_ids"
                )
            out.append(Completion([int(i) for i in ids], [float(x) for x in logps], choice.get("finish_reason")))
        return out

    def prompt_logprobs(self, model: str, ids: list[int]) -> list[float | None]:
        """Each token's log-prob given the ones before it, under `model` (for checks: scoring, no sampling)."""
        body = {"model": model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0.0}
        data = self._json(self._request("POST", "/v1/completions", body), "a scoring request")
        scores = data["choices"][0].get("prompt_logprobs") or []
        return [
            None if entry is None else float(entry[str(token)]["logprob"])
            for token, entry in zip(ids, scores, strict=True)
        ]
